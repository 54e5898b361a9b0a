"""R2Gen-style report cleaning and word-level vocabulary.

The field's report pre-processing (R2Gen, Chen et al., EMNLP 2020, reused by PromptMRG and most of
the line) is:

1. report level: collapse runs of ``..`` (and, for MIMIC-CXR, newlines, runs of ``__`` and double
   spaces), drop list numbering (``"1. "``, ``". 2. "`` ... ``". 5. "``), lower-case, split into
   sentences at ``". "``;
2. sentence level: drop ``" / \\ '`` and the characters ``. , ? ; * ! % ^ & _ + ( ) : < = > @ [ ] { }``
   (R2Gen's character class contains the range ``:-[``, which is why ``< = > @`` go too; hyphens and
   digits stay);
3. join the sentences with ``" . "`` and end with ``" ."``, so every token is separated by a space.

The vocabulary holds the training-split tokens seen at least ``threshold`` times (R2Gen uses 3 for
IU X-Ray and 10 for MIMIC-CXR, with maximum lengths 60 and 100); everything else maps to ``<unk>``.
Differences from R2Gen, on purpose: empty sentences are dropped (R2Gen's filter compares a string
with ``[]`` and keeps them), pad/bos/eos get distinct ids (R2Gen uses 0 for all three), and
truncation keeps the closing ``<eos>`` (R2Gen's ``ids[:max_seq_length]`` can cut it off).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

DATASETS = ("iu_xray", "mimic_cxr", "synthetic")
#: R2Gen's per-dataset defaults: (vocabulary threshold, maximum sequence length).
DATASET_DEFAULTS: dict[str, tuple[int, int]] = {
    "iu_xray": (3, 60),
    "mimic_cxr": (10, 100),
    "synthetic": (3, 80),
}

_SENTENCE_DROP = re.compile(r"[.,?;*!%^&_+():<=>@\[\]{}]")
_NUMBERING = (("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "), (". 5. ", ". "),
              (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". "))

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def _collapse(text: str, pair: str, single: str) -> str:
    while pair in text:
        text = text.replace(pair, single)
    return text


def clean_report(text: str, dataset: str = "iu_xray") -> str:
    """Clean one report the way R2Gen does for ``dataset`` (see the module docstring).

    >>> clean_report("1. Heart size is normal.  2. No effusion.", "iu_xray")
    'heart size is normal . no effusion .'
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if not isinstance(text, str):
        raise TypeError(f"report must be a string, got {type(text).__name__}")
    if dataset == "mimic_cxr":
        text = text.replace("\n", " ")
        text = _collapse(text, "__", "_")
        text = _collapse(text, "  ", " ")
    else:
        # IU X-Ray reports carry no newlines in R2Gen's annotation; treat them as spaces anyway.
        text = text.replace("\n", " ")
    text = _collapse(text, "..", ".")
    for old, new in _NUMBERING:
        text = text.replace(old, new)
    sentences = []
    for sentence in text.strip().lower().split(". "):
        for ch in "\"/\\'":
            sentence = sentence.replace(ch, "")
        sentence = _SENTENCE_DROP.sub("", sentence.strip())
        sentence = " ".join(sentence.split())
        if sentence:
            sentences.append(sentence)
    if not sentences:
        return ""
    return " . ".join(sentences) + " ."


class ReportTokenizer:
    """Word-level tokenizer over R2Gen-cleaned reports.

    Ids: ``0 <pad>``, ``1 <bos>``, ``2 <eos>``, ``3 <unk>``, then the vocabulary in sorted order.
    Build it with :meth:`fit` on the training reports only.
    """

    def __init__(self, tokens: Sequence[str], *, dataset: str = "iu_xray", max_length: int = 60,
                 threshold: int = 3) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 (bos, one token, eos), got {max_length}")
        specials = [PAD, BOS, EOS, UNK]
        words = sorted(set(tokens) - set(specials))
        self.dataset = dataset
        self.max_length = int(max_length)
        self.threshold = int(threshold)
        self.idx2token: list[str] = specials + words
        self.token2idx: dict[str, int] = {t: i for i, t in enumerate(self.idx2token)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    @classmethod
    def fit(cls, reports: Iterable[str], *, threshold: int | None = None, max_length: int | None = None,
            dataset: str = "iu_xray") -> "ReportTokenizer":
        """Vocabulary of the cleaned tokens of ``reports`` seen at least ``threshold`` times.

        ``threshold`` and ``max_length`` default to R2Gen's values for ``dataset``
        (IU X-Ray 3 / 60, MIMIC-CXR 10 / 100, synthetic 3 / 80).
        """
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
        d_threshold, d_length = DATASET_DEFAULTS[dataset]
        threshold = d_threshold if threshold is None else int(threshold)
        max_length = d_length if max_length is None else int(max_length)
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        counts: Counter[str] = Counter()
        n = 0
        for report in reports:
            counts.update(clean_report(report, dataset).split())
            n += 1
        if n == 0:
            raise ValueError("cannot fit a tokenizer on zero reports")
        kept = [t for t, c in counts.items() if c >= threshold]
        return cls(kept, dataset=dataset, max_length=max_length, threshold=threshold)

    @property
    def vocab_size(self) -> int:
        return len(self.idx2token)

    def tokenize(self, text: str) -> list[str]:
        """Cleaned word tokens of ``text`` (no specials, no truncation)."""
        return clean_report(text, self.dataset).split()

    def encode(self, text: str) -> list[int]:
        """``[bos] + ids + [eos]``, at most ``max_length`` ids in all (the body is cut, eos kept)."""
        body = [self.token2idx.get(t, self.unk_id) for t in self.tokenize(text)]
        body = body[: self.max_length - 2]
        return [self.bos_id, *body, self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens joined by spaces; stops at the first eos, skips pad and bos."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary (size {self.vocab_size})")
            words.append(self.idx2token[i])
        return " ".join(words)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def state_dict(self) -> dict:
        return {"idx2token": list(self.idx2token), "dataset": self.dataset,
                "max_length": self.max_length, "threshold": self.threshold}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ReportTokenizer":
        missing = {"idx2token", "dataset", "max_length"} - set(state)
        if missing:
            raise ValueError(f"tokenizer state is missing {sorted(missing)}")
        tok = cls(state["idx2token"][4:], dataset=state["dataset"], max_length=state["max_length"],
                  threshold=state.get("threshold", 1))
        if tok.idx2token != list(state["idx2token"]):
            raise ValueError("tokenizer state is not a saved ReportTokenizer vocabulary "
                             "(specials or order differ)")
        return tok

    def __repr__(self) -> str:
        return (f"ReportTokenizer(vocab_size={self.vocab_size}, dataset={self.dataset!r}, "
                f"max_length={self.max_length}, threshold={self.threshold})")
