"""``mtl-opt train --workload NAME --method SPEC``: one training run of any workload.

Trains with :func:`mtl_opt.experiments.trainer.train` and writes its run folder (``config.json``,
``steps.csv``, ``epochs.csv``, ``checkpoint.pt``, ``result.json``); ``--resume RUN`` continues an
interrupted run from its last checkpoint. Only argparse is imported here; torch loads in
:func:`run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtl_opt.experiments.shared_args import add_out_argument

COMMAND = "train"
COMMAND_HELP = "train any training workload (multimnist, rrg, ...) with any method"


def task_weights_arg(text: str) -> list[float]:
    """``"1,4"`` (or ``"[1,4]"``) -> ``[1.0, 4.0]``."""
    try:
        values = [float(v) for v in text.replace("[", "").replace("]", "").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"task weights must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("task weights must not be empty")
    return values


def add_training_options(p: argparse.ArgumentParser) -> None:
    """The options of a training run that ``train`` and ``compare --workload`` share (defaults:
    the workload's own)."""
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the workload's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the workload's)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (default: the workload's)")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="clip the total gradient norm after aggregation (default 0: off)")
    p.add_argument("--task-weights", type=task_weights_arg, default=None,
                   help="per-task weights ω, comma-separated (default: the workload's, else ones)")
    p.add_argument("--aggregate-at", choices=["parameters", "representation"], default="parameters",
                   help="aggregate the Jacobian of the shared parameters (default) or of the shared "
                        "representation (MGDA-UB)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--amp-dtype", choices=["auto", "bfloat16", "float16"], default="auto",
                   help="autocast dtype with --amp (float16 runs without loss scaling)")
    p.add_argument("--subset", type=int, default=None, metavar="N",
                   help="train on the first N items of the workload's data (its subset option, e.g. "
                        "QM9 molecules; same as ':subset=N' in the workload spec)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="validate and checkpoint every N steps (default: every epoch; 0: at the end)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="multimnist",
                        help="training workload spec, e.g. multimnist or 'multimnist:n_train=2000' "
                             "(default multimnist)")
    parser.add_argument("--method", default="ls", help="method spec, e.g. came_grad or cagrad:c=0.4 (default ls)")
    parser.add_argument("--task", default=None,
                        help="train this task alone (a single-task baseline), e.g. left")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (instead of --epochs)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the workload's)")
    parser.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=None,
                        help="torch optimizer (default: the workload's)")
    add_training_options(parser)
    parser.add_argument("--log-every", type=int, default=10, help="a steps.csv row every N steps (default 10)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes (default 0)")
    parser.add_argument("--distributed", choices=["global", "local", "off"], default="global",
                        help="under torchrun with several processes: aggregate the global batch's "
                             "Jacobian (global, default: the same update as one process), each rank's "
                             "own and average the directions (local), or refuse (off)")
    add_out_argument(parser, prefix="train", what="run folder")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN",
                        help="continue the run in folder RUN from its last checkpoint (its own options)")
    parser.add_argument("--quiet", action="store_true", help="no progress or summary lines")


def config_from_args(args: argparse.Namespace):
    from mtl_opt.experiments.trainer import TrainConfig
    from mtl_opt.problems.workload import workload_spec_with

    return TrainConfig(
        workload=workload_spec_with(args.workload, subset=args.subset), method=args.method, task=args.task, seed=args.seed,
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        task_weights=args.task_weights, aggregate_at=args.aggregate_at, device=args.device,
        amp=args.amp, amp_dtype=args.amp_dtype, log_every=args.log_every,
        eval_every=args.eval_every, num_workers=args.num_workers,
        out=None if args.out is None else str(args.out), distributed=args.distributed,
    )


def _resume(args: argparse.Namespace) -> int:
    """``--resume RUN``: the run's own options; an option given with a value other than the
    run's is refused naming both (``--device`` may change, ``--quiet`` is not an option of the run)."""
    import dataclasses

    from mtl_opt.experiments.trainer import resume_config, train

    if args.out is not None:
        raise ValueError("--resume continues the run in its own folder; drop --out")
    saved, _, _ = resume_config(args.resume, None)
    defaults = argparse.ArgumentParser()
    configure(defaults)
    default_args = defaults.parse_args([])
    given = config_from_args(args).to_dict()
    unset = config_from_args(default_args).to_dict()
    mine = saved.to_dict()
    differ = [f"{k}: given {given[k]!r}, saved {mine[k]!r}" for k in sorted(given)
              if k not in ("device", "out") and given[k] != unset[k] and given[k] != mine[k]]
    if differ:
        raise ValueError(f"resume from {args.resume}: the options differ from the run's in "
                         + "; ".join(differ))
    config = dataclasses.replace(saved, device=args.device) if args.device != default_args.device else None
    train(config, resume=args.resume, verbose=not args.quiet)
    return 0


def run(args: argparse.Namespace) -> int:
    from mtl_opt.experiments.trainer import train

    if args.resume is not None:
        return _resume(args)
    train(config_from_args(args), verbose=not args.quiet)
    return 0
