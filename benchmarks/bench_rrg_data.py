"""Speed of the RRG data half: ``python benchmarks/bench_rrg_data.py [--reports N] [--meteor]``.

Times the rule labeler on N synthetic reports (default 10⁴), report generation, image rendering at
32 and 224 px, batch collation, and the coco-caption metrics on 1000 report pairs. Prints one line
per measurement; nothing is written.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable


def _time(label: str, fn: Callable[[], object], repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    print(f"{label:<48s} {best:9.3f} s")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=10_000, help="reports to label (default 10000)")
    parser.add_argument("--meteor", action="store_true", help="include METEOR (starts a JVM)")
    args = parser.parse_args(argv)

    from mtl_opt.problems.rrg import CheXpertLabeler, ReportTokenizer, SyntheticCXR, clinical_efficacy, collate_rrg, nlg_metrics

    ds = SyntheticCXR(args.reports, seed=0)
    reports: list[str] = []
    _time(f"generate {args.reports} synthetic reports", lambda: reports.extend(ds.reports()))
    labeler = CheXpertLabeler()
    t = _time(f"label {args.reports} reports (CheXpertLabeler)", lambda: labeler.label(reports), repeat=2)
    print(f"{'  -> reports per second':<48s} {args.reports / t:9.0f}")
    for size in (32, 224):
        d = SyntheticCXR(200, image_size=size, views=2, seed=0)
        t = _time(f"render 200 studies x 2 views at {size} px", lambda d=d: [d.image(i) for i in range(len(d))])
        print(f"{'  -> ms per study':<48s} {1000 * t / 200:9.2f}")
    tok = ReportTokenizer.fit(reports, dataset="synthetic")
    small = SyntheticCXR(64, image_size=224, seed=0)
    items = [small[i] for i in range(64)]
    _time("collate a batch of 64 (224 px, 1 view)", lambda: collate_rrg(items, tok), repeat=3)
    refs, hyps = reports[:1000], reports[1000:2000]
    _time("BLEU/ROUGE-L/CIDEr on 1000 pairs", lambda: nlg_metrics(refs, hyps, meteor=False))
    if args.meteor:
        _time("BLEU/METEOR/ROUGE-L/CIDEr on 1000 pairs", lambda: nlg_metrics(refs, hyps))
    _time("clinical efficacy on 1000 pairs (labels both)", lambda: clinical_efficacy(refs, hyps, labeler))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
