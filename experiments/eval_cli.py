"""``mtl-opt eval RUN``: evaluate a trained run of any training workload on its val or test split.

``RUN`` is a run folder of ``mtl-opt train`` (or its ``checkpoint.pt``). The run's own config
rebuilds the workload's data and model (:func:`mtl_opt.experiments.trainer.prepare`), the
checkpoint's weights are loaded (``weights_only``: a checkpoint never runs code), and the
workload's :meth:`~mtl_opt.problems.workload.TrainingWorkload.evaluate` scores the split, exactly
as the trainer scored it at the end of training. Writes ``eval-<split>.json`` (the metrics, the
run, the environment stamp) into ``--out`` (a new or empty folder, claimed before any work) and
prints the workload's declared metrics on one line. Only argparse is imported here.
"""

from __future__ import annotations

import argparse

from mtl_opt.experiments.shared_args import add_out_argument

COMMAND = "eval"
COMMAND_HELP = "evaluate a trained run (mtl-opt train's folder) of any workload on its val or test split"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder of mtl-opt train, or its checkpoint.pt")
    parser.add_argument("--split", choices=["val", "test"], default="test", help="split to evaluate (default test)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--json", action="store_true", help="print the whole metrics JSON")
    add_out_argument(parser, prefix="eval")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    import torch

    from mtl_opt.experiments.environment import environment_stamp
    from mtl_opt.experiments.shared_args import claim_out
    from mtl_opt.experiments.trainer import evaluate_split, prepare, restore, resume_config

    cfg, ckpt, path = resume_config(args.run, None)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dataclasses.replace(cfg, device=device, amp=cfg.amp and torch.device(device).type == "cuda")
    cfg.validate()  # e.g. a CUDA device on a machine without one: refused before any work
    with claim_out(args.out, prefix="eval", command="mtl-opt eval") as folder:
        trained = prepare(cfg)
        try:
            restore(trained, ckpt)
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ValueError(f"checkpoint {str(path)!r} does not fit its run's model: "
                             f"{str(exc).splitlines()[0]}") from None
        metrics = evaluate_split(trained, args.split)
        record = {"run": str(path.parent), "checkpoint": str(path), "workload": trained.workload.spec(),
                  "method": cfg.method, "seed": cfg.seed, "split": args.split, "step": trained.state.step,
                  "metrics": metrics, "environment": environment_stamp()}
        target = folder.path / f"eval-{args.split}.json"
        target.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        shown = ", ".join(f"{m.name}={metrics[m.name]:.4g}" for m in trained.workload.metrics)
        print(f"{args.split} of {trained.workload.spec()} ({cfg.method}, seed {cfg.seed}, step "
              f"{trained.state.step}): {shown}; every metric in {target}")
    return 0
