"""Seeded element-wise methods (GradDrop) draw per run seed in comparisons, like PCGrad."""

from __future__ import annotations

import torch

from mtl_opt.experiments.runner import run_method
from mtl_opt.problems import get_problem


def test_graddrop_and_rgw_draw_per_seed_reproducibly():
    kw = dict(starts=get_problem("quadratic_many").protocol_starts()[:2], seeds=(0, 1), steps=20, lr=1e-2,
              record_every=20)
    for method in ("graddrop", "rgw"):
        run = run_method("quadratic_many", method, **kw)
        assert not torch.allclose(run.x[0::2], run.x[1::2]), method  # seeds are replicates
        again = run_method("quadratic_many", method, **kw)
        assert torch.equal(run.x, again.x), method  # reproducible
        one = run_method("quadratic_many", method, **{**kw, "seeds": (1,)})
        assert torch.equal(one.x, run.x[1::2]), method  # a run's draws depend on its own seed only


def test_default_compare_leaves_out_methods_that_need_positive_losses(tmp_path, capsys):
    import json

    from mtl_opt.cli import main
    from mtl_opt.experiments.compare_cli import default_methods

    kept, left = default_methods()
    assert set(left) == {"db_mtl", "gradnorm"} and {"mgda", "graddrop", "famo", "uw"} <= set(kept)
    out = tmp_path / "cmp"
    assert main(["compare", "--problems", "toy", "--steps", "3", "--out", str(out), "--quiet",
                 "--no-figures"]) == 0
    config = json.loads((out / "config.json").read_text())
    methods = json.dumps(config)
    assert "db_mtl" not in methods and "gradnorm" not in methods and "graddrop" in methods
    assert "famo" in methods  # the loss weightings run on the losses above the problem's floor
    assert "leave out db_mtl" in capsys.readouterr().err
