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
