"""The RRG model: shapes, causal masking, decoding, and the three losses checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtl_opt.problems.rrg.model import (
    ModelConfig,
    RRGModel,
    classification_loss,
    info_nce_loss,
    model_config_for_size,
    report_loss,
    report_target_mask,
)

VOCAB = 60
PAD, BOS, EOS = 0, 1, 2


def tiny(contrastive: bool = False, **kw) -> RRGModel:
    torch.manual_seed(0)
    cfg = model_config_for_size("tiny", vocab_size=VOCAB, pad_id=PAD, bos_id=BOS, eos_id=EOS,
                                contrastive=contrastive, **kw)
    return RRGModel(cfg).eval()


def batch(B: int = 3, V: int = 1, T: int = 9, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, V, 1, size, size, generator=g)
    tokens = torch.randint(3, VOCAB, (B, T), generator=g)
    tokens[:, 0] = BOS
    tokens[0, 5] = EOS
    tokens[0, 6:] = PAD
    tokens[1, -1] = EOS
    classes = torch.randint(0, 4, (B, 14), generator=g)
    return images, tokens, classes


@pytest.mark.parametrize("V", [1, 2])
def test_shapes_for_one_and_two_views(V):
    model = tiny(contrastive=True)
    images, tokens, classes = batch(V=V)
    memory = model.encode(images)
    # 32 px through three stride-2 stages: a 4 x 4 grid per view.
    assert memory.shape == (3, V * 16, model.cfg.d_model)
    assert model.report_logits(memory, tokens).shape == (3, tokens.shape[1], VOCAB)
    assert model.class_logits(memory).shape == (3, 14, 4)
    out = model(images, tokens, classes)
    assert set(out) == {"report", "classification", "contrastive", "memory"}
    for name in model.task_names:
        assert out[name].dim() == 0 and torch.isfinite(out[name])


def test_two_views_are_told_apart():
    """Swapping the views changes the visual tokens beyond a permutation (view embedding)."""
    model = tiny()
    images, _, _ = batch(V=2)
    a = model.encode(images)
    b = model.encode(images.flip(1))
    assert not torch.allclose(a[:, :16], b[:, 16:])


def test_too_many_views_and_bad_shapes_raise():
    model = tiny()
    with pytest.raises(ValueError, match="at most 2 views"):
        model.encode(torch.rand(1, 3, 1, 32, 32))
    with pytest.raises(ValueError, match="images must have shape"):
        model.encode(torch.rand(2, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="vocab"):
        ModelConfig(vocab_size=10, eos_id=12)


def test_causal_mask_future_tokens_do_not_change_earlier_logits():
    model = tiny()
    images, tokens, _ = batch(T=10)
    memory = model.encode(images)
    changed = tokens.clone()
    changed[:, 6:] = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))
    a = model.report_logits(memory, tokens)
    b = model.report_logits(memory, changed)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_greedy_decoding_is_argmax_step_by_step():
    model = tiny()
    images, _, _ = batch(B=2)
    out = model.generate(images, max_length=12)
    memory = model.encode(images)
    for b, seq in enumerate(out):
        prefix = [BOS]
        for t in range(12):
            nxt = int(model.report_logits(memory[b : b + 1], torch.tensor([prefix]))[0, -1].argmax())
            if nxt == EOS:
                break
            prefix.append(nxt)
        assert seq == prefix[1:]


def test_beam_of_one_equals_greedy():
    model = tiny()
    images, _, _ = batch(B=3)
    greedy = model.generate(images, max_length=10)
    assert model._beam(model.encode(images), 10, 1, 0.0) == greedy


@torch.no_grad()
def test_exhaustive_beam_finds_the_most_likely_two_token_report():
    """With beam = vocabulary size and two steps, beam search is exhaustive: compare with brute
    force over every report of at most two tokens."""
    model = tiny()
    images, _, _ = batch(B=2)
    memory = model.encode(images)
    found = model.generate(images, max_length=2, beam_size=VOCAB)
    for b in range(2):
        lp1 = F.log_softmax(model.report_logits(memory[b : b + 1], torch.tensor([[BOS]]))[0, -1], -1)
        prefixes = torch.tensor([[BOS, t] for t in range(VOCAB)])
        lp2 = F.log_softmax(model.report_logits(memory[b : b + 1].expand(VOCAB, -1, -1), prefixes)[:, -1], -1)
        total = lp1[:, None] + lp2  # (first, second)
        total[EOS] = float("-inf")
        total[EOS, 0] = lp1[EOS]  # a report that ends at once
        best = int(total.argmax())
        t1, t2 = divmod(best, VOCAB)
        expected = [] if t1 == EOS else ([t1] if t2 == EOS else [t1, t2])
        assert found[b] == expected


def test_report_target_mask_stops_after_first_eos():
    targets = torch.tensor([[5, 6, EOS, PAD, PAD], [5, 6, 7, 8, 9]])
    assert report_target_mask(targets, PAD, EOS).tolist() == [
        [True, True, True, False, False], [True, True, True, True, True]]
    # R2Gen's tokenizer uses one id (0) for pad and end: the first 0 counts, the rest do not.
    targets = torch.tensor([[5, 0, 0, 0]])
    assert report_target_mask(targets, 0, 0).tolist() == [[True, True, False, False]]


def test_report_loss_is_masked_mean_token_nll():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[4, EOS, PAD], [3, 4, 4]])
    lp = F.log_softmax(logits, -1)
    manual = -(lp[0, 0, 4] + lp[0, 1, EOS] + lp[1, 0, 3] + lp[1, 1, 4] + lp[1, 2, 4]) / 5
    assert torch.allclose(report_loss(logits, targets, PAD, EOS), manual)


def test_classification_loss_matches_hand_computed_cross_entropy():
    # One study, 14 observations; logits zero except observation 0 (state 1 is favoured).
    logits = torch.zeros(1, 14, 4)
    logits[0, 0] = torch.tensor([0.0, 2.0, 0.0, 0.0])
    classes = torch.zeros(1, 14, dtype=torch.long)
    classes[0, 0] = 1
    # obs 0: -log(e^2 / (e^2 + 3)); the 13 others: -log(1/4).
    expected = (-math.log(math.exp(2) / (math.exp(2) + 3)) + 13 * math.log(4)) / 14
    assert classification_loss(logits, classes).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        classification_loss(logits, classes[:, :13])


def test_info_nce_on_two_by_two_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    s = 2.0
    # cosines: S = s * [[1, 1/√2], [0, 1/√2]]
    c = 1 / math.sqrt(2)
    S = [[s * 1, s * c], [0.0, s * c]]
    row = -(math.log(math.exp(S[0][0]) / (math.exp(S[0][0]) + math.exp(S[0][1])))
            + math.log(math.exp(S[1][1]) / (math.exp(S[1][0]) + math.exp(S[1][1])))) / 2
    col = -(math.log(math.exp(S[0][0]) / (math.exp(S[0][0]) + math.exp(S[1][0])))
            + math.log(math.exp(S[1][1]) / (math.exp(S[0][1]) + math.exp(S[1][1])))) / 2
    assert info_nce_loss(img, txt, s).item() == pytest.approx((row + col) / 2, rel=1e-6)


def test_model_contrastive_loss_uses_its_heads():
    model = tiny(contrastive=True)
    images, tokens, classes = batch()
    out = model(images, tokens, classes)
    head = model.contrastive
    memory = model.encode(images)
    expected = info_nce_loss(head.embed_images(memory), head.embed_reports(tokens), head.scale())
    assert torch.allclose(out["contrastive"], expected)
    assert head.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_tiny_has_about_1e5_parameters_and_base_tens_of_millions():
    n = tiny().n_parameters()["total"]
    assert 5e4 <= n <= 2e5
    base = RRGModel(model_config_for_size("base", vocab_size=2000)).n_parameters()["total"]
    assert 1e7 <= base <= 1e8


def test_parameter_groups_partition_the_model():
    model = tiny(contrastive=True)
    shared = {id(p) for p in model.shared_parameters()}
    groups = [{id(p) for p in g} for g in model.task_parameters()]
    assert len(groups) == 3
    every = {id(p) for p in model.parameters()}
    assert shared.union(*groups) == every
    assert sum(len(g) for g in groups) + len(shared) == len(every)


def test_each_task_loss_reaches_only_its_own_head():
    model = tiny(contrastive=True).train()
    images, tokens, classes = batch()
    out = model(images, tokens, classes)
    for k, name in enumerate(model.task_names):
        model.zero_grad()
        out[name].backward(retain_graph=True)
        for j, group in enumerate(model.task_parameters()):
            touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in group)
            assert touched == (j == k), (name, j)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.shared_parameters())


@torch.no_grad()
@pytest.mark.parametrize("V", [1, 2])
def test_cached_decoding_steps_match_the_full_forward(V):
    model = tiny(decoder_layers=2)
    images, tokens, _ = batch(B=3, V=V, T=8)
    memory = model.encode(images)
    full = model.report_logits(memory, tokens)
    cache = model.decoder.start_cache(memory)
    for t in range(tokens.shape[1]):
        step = model.decoder.step(cache, tokens[:, t])
        assert torch.allclose(step, full[:, t], atol=1e-5), t
    # Reordering the cache (beam search) reorders its rows.
    cache = model.decoder.start_cache(memory)
    model.decoder.step(cache, tokens[:, 0])
    model.decoder.reorder_cache(cache, torch.tensor([2, 0, 1]))
    assert torch.allclose(model.decoder.step(cache, tokens[[2, 0, 1], 1]), full[[2, 0, 1], 1], atol=1e-5)
