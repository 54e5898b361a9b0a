"""``mtl-opt rrg``: train, evaluate, and measure task conflict on the RRG workload.

* ``mtl-opt rrg train``: train the multi-task model with any registered method and write a run
  folder (see :mod:`mtl_opt.problems.rrg.train`).
* ``mtl-opt rrg train --resume RUN``: continue an interrupted run from its last checkpoint.
* ``mtl-opt rrg eval RUN`` (or ``--checkpoint RUN``): re-evaluate a saved run and write its
  generated reports beside their references.
* ``mtl-opt rrg compare --methods ls,came_grad``: train several methods on the same data and
  seeds and print the paper-style table (NLG + CE, CE gain over LS, two baselines).
* ``mtl-opt rrg conflict``: the mean report/classification gradient cosine and norm ratio on the
  shared encoder over N batches (optionally after some training), to measure how much a data
  setting makes the tasks disagree.

Only argparse is imported here; torch and the workload load inside :func:`run`.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any

from mtl_opt.experiments.shared_args import (
    add_methods_argument,
    add_out_argument,
    add_seeds_argument,
    claim_out,
    parse_methods,
    parse_seeds,
)

COMMAND = "rrg"
COMMAND_HELP = "radiology report generation: train, eval, compare, conflict"


def _task_weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace("[", "").replace("]", "").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"task weights must be comma-separated numbers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("task weights must not be empty")
    return values


def _key_value(text: str) -> tuple[str, Any]:
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


class _NotesGiven(argparse.Action):
    """Mixed into ``parser``'s action classes by :func:`_note_given_options`: records the option
    as given before storing its value."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        if getattr(namespace, "given_options", None) is None:
            namespace.given_options = {}
        namespace.given_options[self.dest] = option_string
        super().__call__(parser, namespace, values, option_string)


def _note_given_options(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` record every option typed on the command line in ``args.given_options``
    (``{dest: option as typed}``), so that a given option can be told from its default even when
    the values are equal. Call before adding the options."""
    parser.set_defaults(given_options=None)
    for kind in (None, "store", "store_true", "append"):
        base = parser._registry_get("action", kind)
        parser.register("action", kind, type(f"Noted{base.__name__}", (_NotesGiven, base), {}))


def _add_run_options(p: argparse.ArgumentParser, *, steps_default: int | None,
                     one_run: bool = True) -> None:
    """The options of one training run (``one_run=False``: without ``--method`` and ``--seed``,
    which ``compare`` takes as ``--methods`` and ``--seeds``)."""
    if one_run:
        p.add_argument("--method", default="came_grad",
                       help="method spec, e.g. came_grad:kappa=1.5,nu=0.2 (default came_grad with "
                            "the authors' rho=0.5, kappa=1.5, nu=0.2)")
    p.add_argument("--task-weights", type=_task_weights, default=None,
                   help="weights of report, classification[, contrastive] (default 1,4[,1]: the "
                        "authors' cls_weight=4)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (default) or a folder in the R2Gen layout (annotation.json)")
    p.add_argument("--dataset", choices=["iu_xray", "mimic_cxr"], default="iu_xray",
                   help="layout of the --data folder (default iu_xray)")
    p.add_argument("--labels-file", default=None, help="CheXpert labels of the folder's reports")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable dataset entries (they are listed) instead of failing")
    p.add_argument("--synthetic", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="option of the synthetic data set (repeatable), e.g. its disagreement knobs")
    p.add_argument("--n-train", type=int, default=512, help="synthetic training studies")
    p.add_argument("--n-val", type=int, default=64, help="synthetic validation studies")
    p.add_argument("--n-test", type=int, default=64, help="synthetic test studies")
    p.add_argument("--views", type=int, default=1, help="views per synthetic study")
    p.add_argument("--image-size", type=int, default=None,
                   help="pixels per side (default 32 tiny, 128 small, 224 base)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=steps_default, help="training steps")
    length.add_argument("--epochs", type=int, default=None, help="training epochs (instead of --steps)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 3e-3 for the tiny model, 1e-3 otherwise)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default="adamw")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda (cuda:N) or auto (default: cuda when a GPU is found, else cpu)")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bfloat16 where supported)")
    p.add_argument("--amp-dtype", choices=["auto", "bfloat16", "float16"], default="auto")
    p.add_argument("--model-size", "--size", dest="model_size", choices=["tiny", "small", "base"],
                   default="tiny")
    p.add_argument("--contrastive", action="store_true",
                   help="add image-report contrastive alignment as a third task")
    p.add_argument("--aggregate-at", choices=["parameters", "representation"], default="parameters",
                   help="aggregate the Jacobian over the encoder's parameters (default) or its "
                        "output features (MGDA-UB)")
    if one_run:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers")


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mtl-opt rrg``: the ``train``, ``eval`` and ``conflict`` sub-subcommands."""
    sub = parser.add_subparsers(dest="rrg_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train the multi-task RRG model and evaluate it",
                       description="Train the multi-task report generation model with one method.")
    _note_given_options(t)  # --resume refuses options that differ from the run's own
    _add_run_options(t, steps_default=None)
    t.add_argument("--log-every", type=int, default=10, help="log losses, drift, diffusion every N steps")
    t.add_argument("--eval-every", type=int, default=None,
                   help="validate and checkpoint every N steps (default: every epoch; 0: at the end)")
    t.add_argument("--val-max-samples", type=int, default=None, help="validate on at most N studies")
    t.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in this folder from its last checkpoint with its own "
                        "options (--device may differ; another option that differs is refused)")
    t.add_argument("--eval-split", choices=["val", "test"], default="test")
    t.add_argument("--eval-max-samples", type=int, default=None)
    t.add_argument("--beam-size", type=int, default=1, help="beam width (1: greedy)")
    t.add_argument("--max-gen-length", type=int, default=None)
    t.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    t.add_argument("--samples", type=int, default=5, help="generated reports written to samples.md")
    add_out_argument(t, prefix="rrg", what="run folder")
    t.add_argument("--quiet", action="store_true")

    e = sub.add_parser("eval", help="re-evaluate a saved run",
                       description="Re-evaluate a saved RRG run from its checkpoint.")
    e.add_argument("ckpt", nargs="?", default=None, metavar="CKPT",
                   help="checkpoint.pt or its run folder")
    e.add_argument("--checkpoint", default=None, help="the same as CKPT")
    e.add_argument("--split", choices=["val", "test"], default=None, help="default: the run's eval split")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    e.add_argument("--beam-size", type=int, default=None)
    e.add_argument("--eval-max-samples", type=int, default=None)
    e.add_argument("--no-meteor", action="store_true")
    e.add_argument("--samples", type=int, default=5, help="generated reports in samples-<split>.md")
    e.add_argument("--json", action="store_true",
                   help="print the whole metrics JSON (default: a one-line summary; the JSON is "
                        "always written)")
    e.add_argument("--out", default=None,
                   help="a folder for eval-<split>.json and the samples, or a .json file for the "
                        "metrics (samples beside it); default: the run folder")

    m = sub.add_parser("compare", help="train several methods on the same data and tabulate them",
                       description="Train each method on the same data and seeds, then print and "
                                   "write the paper-style table: BLEU-1..4, METEOR, ROUGE-L, "
                                   "CIDEr, CE under the PromptMRG and CAME-Grad conventions, each "
                                   "method's CE gain over linear scalarization (ls), and a "
                                   "majority-class and a copy-the-most-common-report baseline.")
    add_methods_argument(m, required=True)  # the CE gain is taken over 'ls'
    add_seeds_argument(m)
    _add_run_options(m, steps_default=None, one_run=False)
    m.add_argument("--eval-every", type=int, default=None,
                   help="validate and checkpoint every N steps (default: every epoch; 0: at the end)")
    m.add_argument("--eval-split", choices=["val", "test"], default="test")
    m.add_argument("--eval-max-samples", type=int, default=None)
    m.add_argument("--beam-size", type=int, default=1)
    m.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    add_out_argument(m, prefix="rrg-compare")
    m.add_argument("--quiet", action="store_true", help="print only the table and the folder")

    c = sub.add_parser("conflict", help="measure report/classification gradient conflict",
                       description="Mean cosine and norm ratio of the two tasks' encoder gradients "
                                   "over N batches, after --steps of training with --method.")
    _add_run_options(c, steps_default=0)
    c.add_argument("--batches", type=int, default=10, help="batches to average over")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table line")



def run(args: argparse.Namespace) -> int:
    if args.rrg_command == "train":
        return _run_train(args)
    if args.rrg_command == "eval":
        return _run_eval(args)
    if args.rrg_command == "compare":
        return _run_compare(args)
    return _run_conflict(args)


def _config_from_args(args: argparse.Namespace):
    from mtl_opt.problems.rrg.train import RRGConfig

    synthetic = dict(args.synthetic)
    cfg = RRGConfig(
        method=getattr(args, "method", "came_grad"), task_weights=args.task_weights, data=args.data, dataset=args.dataset,
        labels_file=args.labels_file, skip_bad=args.skip_bad, synthetic=synthetic,
        n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, views=args.views,
        image_size=args.image_size, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        optimizer=args.optimizer, grad_clip=args.grad_clip, device=args.device, amp=args.amp,
        amp_dtype=args.amp_dtype, model_size=args.model_size, contrastive=args.contrastive,
        aggregate_at=args.aggregate_at, seed=getattr(args, "seed", 0), num_workers=args.num_workers,
    )
    return cfg


def _train_config_from_args(args: argparse.Namespace):
    """The :class:`RRGConfig` of ``rrg train``'s options."""
    cfg = _config_from_args(args)
    cfg.eval_every = args.eval_every
    cfg.val_max_samples = args.val_max_samples
    cfg.log_every = args.log_every
    cfg.eval_split = args.eval_split
    cfg.eval_max_samples = args.eval_max_samples
    cfg.beam_size = args.beam_size
    cfg.max_gen_length = args.max_gen_length
    cfg.meteor = not args.no_meteor
    cfg.n_report_samples = args.samples
    cfg.out = args.out
    return cfg


#: Options of ``rrg train`` that a resumed run may take whatever the run was started with.
_RESUME_FREE = ("device", "quiet", "resume")
#: ``rrg train`` options whose config field has another name.
_OPTION_FIELD = {"no_meteor": "meteor", "samples": "n_report_samples"}


def _resume_conflicts(args: argparse.Namespace, saved: Any, run_dir: Any) -> list[str]:
    """Each option given with ``--resume`` whose value differs from the run's saved config."""
    from pathlib import Path

    wanted = _train_config_from_args(args)
    conflicts = []
    for dest, option in (getattr(args, "given_options", None) or {}).items():
        if dest in _RESUME_FREE:
            continue
        if dest == "out":
            if Path(args.out).resolve() != Path(run_dir).resolve():
                conflicts.append(f"{option} {args.out!r} (the run's folder is {str(run_dir)!r})")
            continue
        field = _OPTION_FIELD.get(dest, dest)
        given, kept = getattr(wanted, field), getattr(saved, field)
        if given != kept:
            conflicts.append(f"{option} gives {field}={given!r}, the run has {field}={kept!r}")
    return conflicts


def _run_train(args: argparse.Namespace) -> int:
    from mtl_opt.problems.rrg.train import RRGConfig, load_checkpoint, train_rrg

    if args.resume is not None:
        from pathlib import Path

        ckpt = Path(args.resume)
        ckpt = ckpt / "checkpoint.pt" if ckpt.is_dir() else ckpt
        if not ckpt.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {str(ckpt)!r}")
        saved = RRGConfig.from_dict(load_checkpoint(ckpt)["config"])
        conflicts = _resume_conflicts(args, saved, ckpt.parent)
        if conflicts:
            raise ValueError(f"--resume {args.resume}: a resumed run keeps its own options, and "
                             f"{len(conflicts)} given option(s) differ: {'; '.join(conflicts)}. "
                             "Drop them, or start a new run")
        saved.device = args.device
        from mtl_opt._output_folder import reclaim_output_folder

        with reclaim_output_folder(ckpt.parent, command="mtl-opt rrg train --resume"):
            result = train_rrg(saved, verbose=not args.quiet, resume=args.resume)
        if args.quiet:
            print(result["run_dir"])
        return 0
    cfg = _train_config_from_args(args)
    cfg.validate()  # every option checked before the run folder is claimed
    with claim_out(args.out, prefix="rrg", command="mtl-opt rrg train") as folder:
        cfg.out = str(folder.path)
        result = train_rrg(cfg, verbose=not args.quiet)
    if args.quiet:
        print(result["run_dir"])
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from mtl_opt.problems.rrg.metrics import format_metric, metrics_summary
    from mtl_opt.problems.rrg.train import _write_samples, build_datasets, evaluate_rrg, load_run, write_samples_csv

    if args.ckpt is not None and args.checkpoint is not None and args.ckpt != args.checkpoint:
        raise ValueError(f"two checkpoints given: {args.ckpt!r} and --checkpoint {args.checkpoint!r}")
    checkpoint = args.ckpt or args.checkpoint
    if checkpoint is None:
        raise ValueError("give the checkpoint to evaluate: mtl-opt rrg eval RUN_FOLDER_OR_CKPT")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer, cfg, _ = load_run(checkpoint, device=device)
    if torch.device(device).type != "cuda" and cfg.amp:
        print("the run was trained with --amp; evaluating in float32 on the CPU", file=sys.stderr)
        cfg.amp = False
    split = args.split or cfg.eval_split
    if args.beam_size is not None:
        cfg.beam_size = args.beam_size
    if args.eval_max_samples is not None:
        cfg.eval_max_samples = args.eval_max_samples
    if args.no_meteor:
        cfg.meteor = False
    cfg.n_report_samples = args.samples
    cfg.validate()  # with this command's options: a bad one is refused before any work
    from mtl_opt._output_folder import claim_output_folder, exclusive_file

    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent
    if args.out is None:  # documented: the run's own folder, beside its checkpoint
        folder, metrics_path = run_dir, run_dir / f"eval-{split}.json"
    elif args.out.endswith(".json"):
        metrics_path = Path(args.out)
        folder = metrics_path.parent
        if metrics_path.exists():
            raise ValueError(f"{metrics_path} exists; choose another --out")
    else:  # claimed before the evaluation
        folder = claim_output_folder(args.out, command="mtl-opt rrg eval").path
        metrics_path = folder / f"eval-{split}.json"
    datasets = build_datasets(cfg)
    result = evaluate_rrg(model, tokenizer, datasets[split], cfg, split=split)
    record = {"split": split, "n": result["n"], "metrics": result["metrics"],
              "checkpoint": str(checkpoint), "device": device, "amp": cfg.amp,
              "beam_size": cfg.beam_size}
    text = json.dumps(record, indent=2)
    if args.out is None or not args.out.endswith(".json"):
        metrics_path.write_text(text)
    else:
        exclusive_file(metrics_path, text)  # never over another evaluation's metrics
    write_samples_csv(folder / f"samples-{split}.csv", result["samples"])
    _write_samples(folder / f"samples-{split}.md", result["samples"], cfg.n_report_samples)
    print(f"metrics written to {metrics_path}; generated reports beside their references in "
          f"{folder / f'samples-{split}.csv'}", file=sys.stderr)
    if "METEOR_status" in result["metrics"]:
        print(f"METEOR {format_metric(result['metrics']['METEOR'])}: "
              f"{result['metrics']['METEOR_status']}", file=sys.stderr)
    if args.json:
        print(text)
    else:
        print(f"{split} ({result['n']} studies): {metrics_summary(result['metrics'])}; "
              f"all {len(result['metrics'])} figures in {metrics_path}")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from mtl_opt.experiments.rrg_compare import compare_rrg

    methods = parse_methods(args.methods)
    seeds = list(parse_seeds(args.seeds))
    cfg = _config_from_args(args)
    cfg.eval_every = args.eval_every
    cfg.eval_split = args.eval_split
    cfg.eval_max_samples = args.eval_max_samples
    cfg.beam_size = args.beam_size
    cfg.meteor = not args.no_meteor
    with claim_out(args.out, prefix="rrg-compare", command="mtl-opt rrg compare") as folder:
        compare_rrg(methods, cfg, seeds=seeds, out=str(folder.path), verbose=not args.quiet)
    return 0


def _run_conflict(args: argparse.Namespace) -> int:
    from mtl_opt.problems.rrg.train import conflict_study

    cfg = _config_from_args(args)
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    result = conflict_study(cfg, n_batches=args.batches)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
        print(CONFLICT_LEGEND)
    return 0


CONFLICT_LEGEND = (
    "cos: cosine between the report and classification gradients on the shared encoder, per batch "
    "(below 0: they conflict; frac_conflicting: the share of such batches); norm_ratio: "
    "‖g_cls‖ / ‖g_report‖, the unweighted gradient norms' ratio; weighted_norm_ratio_mean: the same "
    "with the task weights, ω_cls‖g_cls‖ / (ω_report‖g_report‖); _mean/_std over the batches."
)
