"""``mtl-opt bench``: what one aggregation costs next to the floor, and next to TorchJD.

Every Gramian method needs one pass over the Jacobian ``G`` (K × d) for ``M = G Gᵀ`` and one for
``βᵀ G``; everything else is a K × K problem. The **floor** is therefore the time of

    M = G @ G.T;  d = w @ G          (w a float32 K-vector already on G's device)

on the same ``G`` in the same run (a plain ``G @ G.T``, as the issue defines it; the library
computes its CPU Gramian in column blocks, which MKL runs faster for some K, so ratios below 1
occur), and a method's cost is quoted as ``ratio_to_floor``
(its median over the floor's median). When TorchJD is installed, the same-named TorchJD
aggregator runs on the same ``G`` (``speedup_vs_torchjd`` = TorchJD's median over ours, and the
cosine between the two directions as a sanity check of the comparison).

Timing: ``warmup`` untimed calls, then ``repeats`` timed calls (``time.perf_counter``), each
bracketed by ``torch.cuda.synchronize`` on a GPU so a call's time includes its host syncs and
kernels. Median, min and max are reported; quote medians and ratios from one run (the machine
may be shared).

Peak memory (``peak_mem_bytes``): on CUDA, ``torch.cuda.max_memory_allocated`` above what was
allocated before the call. On Linux CPUs, the growth of the resident set during one call
(``/proc/self/status`` ``VmHWM`` after resetting it through ``/proc/self/clear_refs``); for this
the memory pass (after the timings) fixes glibc's mmap threshold at 64 KiB so that every large
tensor is a fresh mapping, and returns the heap's free pages to the system (``malloc_trim``)
before each measured call, so that memory freed by earlier calls is not reused unseen (without
it most rows read 0). It is accurate to a few hundred KiB. Elsewhere the column is empty.

Output (``--out``): ``bench.csv`` (one row per device, K, d and implementation; columns in
:data:`COLUMNS`), ``bench.md`` (the same as a Markdown table), ``ratio_to_floor.html`` and
``time_ms.html`` (plotly) and ``config.json`` (the exact options and versions).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtl_opt.experiments.environment import environment_stamp
from mtl_opt.experiments.html_pages import write_figure
from mtl_opt.experiments.markdown_table import to_markdown
from mtl_opt.experiments.shared_args import add_methods_argument, add_out_argument, claim_out, parse_methods

COMMAND = "bench"
COMMAND_HELP = "time every method against the G Gᵀ + wᵀG floor (and TorchJD)"

__all__ = [
    "COLUMNS",
    "TORCHJD_EQUIVALENTS",
    "Timing",
    "configure",
    "floor_call",
    "make_jacobian",
    "measure_peak_memory",
    "run",
    "run_benchmark",
    "time_call",
    "torchjd_aggregator",
    "write_outputs",
]

DEFAULT_K = (2, 4, 8, 16)
DEFAULT_D = (10**4, 10**6, 10**7)

#: Columns of ``bench.csv``, in order.
COLUMNS = (
    "device",        # "cpu" or "cuda:0"
    "threads",       # torch intra-op threads
    "K",             # tasks (rows of G)
    "d",             # parameters (columns of G)
    "dtype",         # of G
    "method",        # our method spec ("cagrad", "nash_mtl:solver=cvxpy"), "floor", or "aggregate_many"
    "impl",          # "floor", "mtl_opt", "mtl_opt_many" or "torchjd"
    "reference",     # the TorchJD aggregator's repr on torchjd rows
    "repeats",       # timed calls
    "median_ms", "min_ms", "max_ms",
    "floor_ms",      # the floor's median, same device, K, d and run
    "ratio_to_floor",  # median_ms / floor_ms
    "peak_mem_bytes",  # extra memory of one call (see the module docstring); empty if unknown
    "torchjd_ms",      # on mtl_opt rows: the same-named TorchJD aggregator's median
    "speedup_vs_torchjd",  # torchjd_ms / median_ms
    "cosine_vs_torchjd",   # cosine between our direction and TorchJD's
    "note",
)

#: Our method name -> (TorchJD class name, keyword arguments given K). Hyperparameters match
#: ours at their defaults (CAGrad c = 0.4; Nash-MTL max_norm = 1, update_weights_every = 1,
#: optim_niter = 20). LS is the plain sum (TorchJD's ``Sum``), our scale convention.
TORCHJD_EQUIVALENTS: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "ls": ("Sum", lambda K: {}),
    "mgda": ("MGDA", lambda K: {}),
    "pcgrad": ("PCGrad", lambda K: {}),
    "cagrad": ("CAGrad", lambda K: {"c": 0.4}),
    "nash_mtl": ("NashMTL", lambda K: {"n_tasks": K}),
    "imtl_g": ("IMTLG", lambda K: {}),
    # The authors sum the aligned rows (our p = 1); TorchJD's default averages them.
    "aligned_mtl": ("AlignedMTL", lambda K: {"pref_vector": torch.ones(K)}),
    "upgrad": ("UPGrad", lambda K: {}),
    "dualproj": ("DualProj", lambda K: {}),
    "config": ("ConFIG", lambda K: {}),
    "fairgrad": ("FairGrad", lambda K: {"alpha": 1.0}),
    "graddrop": ("GradDrop", lambda K: {}),
    # The paper's β = 0.01 (ours); TorchJD defaults to 0.5.
    "gradvac": ("GradVac", lambda K: {"beta": 0.01}),
    "rgw": ("Random", lambda K: {}),
    "pcd": ("PCD", lambda K: {"tau": 0.02, "beta": 0.999, "eps": 1e-8}),
}


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of ``repeats`` timed calls."""

    times_s: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times_s)

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.times_s)

    @property
    def max_ms(self) -> float:
        return 1e3 * max(self.times_s)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls, synchronising a GPU."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _fix_glibc_mmap_threshold(nbytes: int = 64 * 1024) -> bool:
    """Make glibc serve every allocation above ``nbytes`` from a fresh mapping (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, nbytes))


def _release_free_heap() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim(0)``), so that memory
    freed by earlier calls, still resident, is not silently reused by the call being measured."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _rss_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_bytes("VmHWM")
        return True
    except OSError:
        return False


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Extra memory (bytes) that one call of ``fn()`` needs at its peak; ``None`` if unknown.

    CUDA: ``max_memory_allocated`` above the allocation before the call. Linux CPU: growth of the
    resident set (reset the high-water mark, call, read it). Other platforms: ``None``.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    if device.type == "cpu" and _rss_peak_supported():
        gc.collect()
        _release_free_heap()  # else the call reuses resident pages and its growth reads 0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _proc_status_bytes("VmRSS")
        out = fn()
        peak = _proc_status_bytes("VmHWM") - before
        del out
        return max(int(peak), 0)
    return None


def make_jacobian(K: int, d: int, device: torch.device, *, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """A reproducible Jacobian with correlated, partly conflicting rows of unequal norms.

    ``G = diag(s) · A · Z`` with ``Z`` (K × d) and ``A`` (K × K) standard normal and ``s`` spaced
    logarithmically from 1 to 10: rows are correlated (some pairs conflict) and their norms
    differ, so normalisations and active sets are exercised as in training.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    mix = torch.randn(K, K, generator=gen, device=device, dtype=dtype)
    scale = torch.logspace(0, 1, K, device=device, dtype=dtype).unsqueeze(1)
    G = torch.empty(K, d, device=device, dtype=dtype)
    chunk = 1 << 20  # build in column blocks so the scratch Z stays small at d = 10^7
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        Z = torch.randn(K, stop - start, generator=gen, device=device, dtype=dtype)
        G[:, start:stop] = scale * (mix @ Z)
    return G


def floor_call(G: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
    """The two passes every Gramian method needs: ``G Gᵀ`` and ``wᵀ G`` (no K × K work)."""
    w = torch.ones(G.shape[0], device=G.device, dtype=G.dtype)

    def floor() -> tuple[Tensor, Tensor]:
        return G @ G.T, w @ G

    return floor


def torchjd_aggregator(name: str, K: int) -> tuple[object | None, str]:
    """The TorchJD aggregator that matches our method ``name`` at K tasks, or ``(None, why)``."""
    if name not in TORCHJD_EQUIVALENTS:
        return None, f"no TorchJD equivalent of {name}"
    try:
        import torchjd.aggregation as tja
    except ImportError as exc:
        return None, f"torchjd not importable ({exc})"
    cls_name, kwargs = TORCHJD_EQUIVALENTS[name]
    cls = getattr(tja, cls_name, None)
    if cls is None:
        return None, f"this TorchJD has no {cls_name}"
    try:
        return cls(**kwargs(K)), ""
    except Exception as exc:  # missing optional solver dependencies raise ImportError here
        return None, f"TorchJD {cls_name} unavailable: {type(exc).__name__}: {exc}"


def _quiet(ref: Callable[[Tensor], Tensor], G: Tensor, warned: dict[str, int]) -> Tensor:
    """Call a TorchJD aggregator, counting its warnings in ``warned`` instead of printing them.

    TorchJD's cvxpy-based aggregators warn on most calls (Nash-MTL: "problem is not DPP", i.e. it
    is re-compiled on every solve; ECOS: "Solution may be inaccurate"); the counts end up in the
    row's ``note`` so they are reported, once, with the timing they belong to.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ref(G)
    for w in caught:
        msg = str(w.message).split(".")[0][:80]
        warned[msg] = warned.get(msg, 0) + 1
    return out


def _cosine(a: Tensor, b: Tensor) -> float:
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = float(a64.norm()), float(b64.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a64 @ b64) / (na * nb)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_options(
    methods: Sequence[str], *, Ks: Sequence[int], ds: Sequence[int], devices: Sequence[str],
    repeats: int, warmup: int, threads: int | None, max_jacobian_bytes: int | None, seed: int,
) -> tuple[list[tuple[str, str, dict[str, Any]]], list[tuple[torch.device, int, int]], list[tuple[str, int, int, int]]]:
    """Check every option of :func:`run_benchmark` before any timing (and before an output folder
    is claimed): ``(specs, groups, skipped)``. Every method is built, every device is parsed and
    must be present, and a size limit that skips every size is refused (the table would be
    empty)."""
    import mtl_opt

    specs = [(spec, *mtl_opt.parse_method_spec(spec)) for spec in methods]
    if not specs:
        raise ValueError("no method to benchmark")
    labels = [s for s, _, _ in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method specs repeat: {labels}")
    for spec, name, hyper in specs:
        try:
            mtl_opt.get_aggregator(name, **hyper)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"method {spec!r}: {exc}") from None
    _check_int("repeats", repeats, 1)
    _check_int("warmup", warmup, 0)
    _check_int("seed", seed, 0)
    if threads is not None:
        _check_int("threads", threads, 1)
    Ks = [_check_int("K", K, 1) for K in Ks]
    ds = [_check_int("d", d, 1) for d in ds]
    if not Ks or not ds or not devices:
        raise ValueError("give at least one K, one d and one device")
    if max_jacobian_bytes is not None:
        _check_int("max_jacobian_bytes", max_jacobian_bytes, 1)
    parsed = []
    for device_name in devices:
        try:
            device = torch.device(device_name)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"unknown device {device_name!r}: expected cpu, cuda, cuda:N or auto") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device_name!r} was asked for but CUDA is not available")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"device {device_name!r}: there are only {torch.cuda.device_count()} CUDA devices")
        elif device.type != "cpu":
            raise ValueError(f"device {device_name!r} is not supported: expected cpu, cuda, cuda:N or auto")
        parsed.append((device_name, device))
    groups, skipped = [], []
    for device_name, device in parsed:
        for K in Ks:
            for d in ds:
                nbytes = K * d * 4
                if max_jacobian_bytes is not None and nbytes > max_jacobian_bytes:
                    skipped.append((device_name, K, d, nbytes))
                    continue
                groups.append((device, K, d))
    if not groups:
        raise ValueError(f"every size is larger than the limit of {max_jacobian_bytes / 2**20:g} MiB "
                         "(--max-jacobian-mb): nothing would be timed")
    return specs, groups, skipped


def run_benchmark(
    methods: Sequence[str],
    *,
    Ks: Sequence[int] = DEFAULT_K,
    ds: Sequence[int] = DEFAULT_D,
    devices: Sequence[str] = ("cpu",),
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = 1,
    torchjd: bool = True,
    memory: bool = True,
    many: bool = True,
    max_jacobian_bytes: int | None = None,
    seed: int = 0,
    interleave: bool = True,
    progress: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Time every method (specs like ``"cagrad:c=0.5"``) on every (device, K, d); rows of
    :data:`COLUMNS`. See the module docstring for what is measured and how.

    Within one (device, K, d) the floor, our methods, ``aggregate_many`` and the TorchJD
    aggregators are timed *interleaved* (one call of each per round, ``repeats`` rounds), so a
    load spike on a shared machine hits them alike and the ratios stay meaningful
    (``interleave=False``: each one's calls back to back, as a training loop makes them; at small
    d this keeps caches warm and gives lower times). Peak memory is
    measured afterwards in a separate pass, so the allocator setting it needs does not touch the
    timings.
    """
    say = progress or (lambda _msg: None)
    specs, groups, skipped = check_options(methods, Ks=Ks, ds=ds, devices=devices, repeats=repeats,
                                           warmup=warmup, threads=threads,
                                           max_jacobian_bytes=max_jacobian_bytes, seed=seed)
    for device_name, K, d, nbytes in skipped:
        say(f"[{device_name}] K={K} d={d:.0e}: skipped (G is {nbytes / 2**20:.0f} MiB)")
    if threads is not None:
        torch.set_num_threads(int(threads))
    torchjd_note = ""
    if torchjd:
        try:
            import torchjd.aggregation  # noqa: F401
        except ImportError as exc:
            torchjd, torchjd_note = False, f"torchjd not importable ({exc}); comparison skipped"
            say(torchjd_note)

    rows: list[dict[str, Any]] = []
    group_rows = []
    for device, K, d in groups:
        out = _time_group(specs, K, d, device, repeats=repeats, warmup=warmup, torchjd=torchjd,
                          many=many, seed=seed, say=say, torchjd_note=torchjd_note,
                          interleave=interleave)
        group_rows.append(out)
        rows.extend(out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if memory:
        say("peak memory pass ...")
        _fix_glibc_mmap_threshold()
        for (device, K, d), out in zip(groups, group_rows):
            _memory_group(specs, K, d, device, out, torchjd=torchjd, many=many, seed=seed)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _candidates(specs, G: Tensor, *, torchjd: bool, many: bool) -> tuple[list[tuple], dict[str, Any]]:
    """The calls to time on ``G``: ``(label, impl, method, call, reference)``, and notes: per
    method without a usable TorchJD counterpart, why (a string); per TorchJD call, the counts of
    the warnings it raised (a dict filled as it runs)."""
    import mtl_opt

    K = G.shape[0]
    losses = torch.linspace(0.5, 2.0, K)  # for methods that use losses (MGDA "loss" normalisation)
    calls: list[tuple] = [("floor", "floor", "floor", floor_call(G), None)]
    for spec, name, hyper in specs:
        agg = mtl_opt.get_aggregator(name, **hyper)
        ctx = {"losses": losses} if agg.uses_losses else {}
        calls.append((spec, "mtl_opt", spec, (lambda agg=agg, ctx=ctx: agg(G, **ctx)), None))
    if many and len(specs) > 1:
        aggs = {spec: mtl_opt.get_aggregator(name, **hyper) for spec, name, hyper in specs}
        calls.append(("aggregate_many", "mtl_opt_many", "aggregate_many",
                      (lambda: mtl_opt.aggregate_many(G, aggs, losses=losses)), None))
    notes: dict[str, str] = {}
    if torchjd:
        for spec, name, _ in specs:
            ref, why = torchjd_aggregator(name, K)
            if ref is None:
                notes[spec] = why
            else:
                warned: dict[str, int] = {}
                notes[spec + " (torchjd)"] = warned  # type: ignore[assignment]
                calls.append((spec + " (torchjd)", "torchjd", spec,
                              (lambda ref=ref, warned=warned: _quiet(ref, G, warned)), repr(ref)))
    return calls, notes


def _time_group(specs, K, d, device, *, repeats, warmup, torchjd, many, seed, say,
                torchjd_note, interleave=True) -> list[dict[str, Any]]:
    G = make_jacobian(K, d, device, seed=seed)
    base = {"device": str(device), "threads": torch.get_num_threads(), "K": K, "d": d,
            "dtype": str(G.dtype).replace("torch.", "")}
    calls, notes = _candidates(specs, G, torchjd=torchjd, many=many)

    # Warm up (and weed out calls that fail), then interleave the timed rounds.
    failed: dict[str, str] = {}
    directions: dict[str, Tensor] = {}
    for label, impl, method, call, _ in calls:
        try:
            for _ in range(max(warmup, 1)):
                result = call()
            if impl in ("mtl_opt", "torchjd"):
                directions[label] = result
        except Exception as exc:
            failed[label] = f"failed: {type(exc).__name__}: {exc}"
    live = [c for c in calls if c[0] not in failed]
    times: dict[str, list[float]] = {c[0]: [] for c in live}
    if interleave:
        for _ in range(repeats):
            for label, _, _, call, _ in live:
                _synchronize(device)
                start = time.perf_counter()
                call()
                _synchronize(device)
                times[label].append(time.perf_counter() - start)
    else:
        for label, _, _, call, _ in live:
            times[label] = list(time_call(call, device, repeats=repeats, warmup=warmup).times_s)
    if "floor" in failed:
        raise RuntimeError(f"the floor itself failed on K={K}, d={d}: {failed['floor']}")
    floor_ms = Timing(tuple(times["floor"])).median_ms

    out: list[dict[str, Any]] = []
    by_method: dict[tuple[str, str], dict[str, Any]] = {}
    separate_ms = 0.0
    for label, impl, method, _, ref in calls:
        r: dict[str, Any] = {c: None for c in COLUMNS}
        r.update(base, method=method, impl=impl, reference=ref, note=failed.get(label, ""))
        if label in times:
            t = Timing(tuple(times[label]))
            r.update(repeats=len(t.times_s), median_ms=t.median_ms, min_ms=t.min_ms, max_ms=t.max_ms,
                     floor_ms=floor_ms, ratio_to_floor=t.median_ms / floor_ms)
            if impl == "mtl_opt":
                separate_ms += t.median_ms
        out.append(r)
        by_method[(impl, method)] = r
    for label, impl, method, _, _ in calls:
        warned = notes.get(label)
        if impl == "torchjd" and warned:
            r = by_method[(impl, method)]
            counts = "; ".join(f"{msg!r} x{n}" for msg, n in warned.items())
            r["note"] = (r["note"] + " " if r["note"] else "") + f"TorchJD warned: {counts}"
    for r in out:
        if r["impl"] == "mtl_opt_many" and r["median_ms"] is not None:
            n = sum(1 for x in out if x["impl"] == "mtl_opt")
            r["note"] = f"{n} methods on one Gramian; separate calls sum to {separate_ms:.4g} ms"
        if r["impl"] != "mtl_opt" or r["median_ms"] is None:
            continue
        ref_row = by_method.get(("torchjd", r["method"]))
        if ref_row is not None and ref_row["median_ms"] is not None:
            cos = _cosine(directions[r["method"]], directions[r["method"] + " (torchjd)"])
            r.update(torchjd_ms=ref_row["median_ms"], speedup_vs_torchjd=ref_row["median_ms"] / r["median_ms"],
                     cosine_vs_torchjd=cos)
            ref_row["cosine_vs_torchjd"] = cos
        elif ref_row is not None:
            r["note"] = f"TorchJD {ref_row['reference']} {ref_row['note']}"
        elif not torchjd and torchjd_note:
            r["note"] = torchjd_note
        elif isinstance(notes.get(r["method"]), str):
            r["note"] = notes[r["method"]]
    del G, directions
    summary = ", ".join(
        f"{r['method']}{' (torchjd)' if r['impl'] == 'torchjd' else ''} {r['ratio_to_floor']:.2f}x"
        for r in out[1:] if r["ratio_to_floor"] is not None
    )
    say(f"[{device}] K={K} d={d:.0e}: floor {floor_ms:.4g} ms; ratio to floor: {summary}")
    return out


def _memory_group(specs, K, d, device, out, *, torchjd, many, seed) -> None:
    """Fill ``peak_mem_bytes`` of the rows ``out`` of one (device, K, d) (see the module docs)."""
    G = make_jacobian(K, d, device, seed=seed)
    calls, _ = _candidates(specs, G, torchjd=torchjd, many=many)
    rows = {(r["impl"], r["method"]): r for r in out}
    for _, impl, method, call, _ in calls:
        r = rows.get((impl, method))
        if r is None or r["median_ms"] is None:
            continue
        call()  # first-call allocations (caches, solver set-up) are not the steady state
        r["peak_mem_bytes"] = measure_peak_memory(call, device)
    del G


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def write_outputs(rows: list[dict[str, Any]], out_dir: str | Path, config: dict[str, Any]) -> dict[str, Path]:
    """Write bench.csv, bench.md, ratio_to_floor.html, time_ms.html and config.json."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    paths = {"csv": out / "bench.csv", "md": out / "bench.md", "ratio_html": out / "ratio_to_floor.html",
             "time_html": out / "time_ms.html", "config": out / "config.json"}
    df.to_csv(paths["csv"], index=False)
    shown = df[["device", "K", "d", "method", "impl", "median_ms", "min_ms", "max_ms", "ratio_to_floor",
                "peak_mem_bytes", "speedup_vs_torchjd", "cosine_vs_torchjd", "note"]]
    header = (f"Produced by `mtl-opt bench` ({config.get('command', '')}); "
              f"{config.get('threads')} thread(s), {config.get('repeats')} timed calls each, "
              f"medians in ms. Floor = `G @ G.T` + `w @ G` on the same G in the same run.\n\n")
    paths["md"].write_text(header + to_markdown(shown) + "\n")
    fig, fig2 = bench_figures(df)
    write_figure(fig, paths["ratio_html"], height=int(fig.layout.height))
    write_figure(fig2, paths["time_html"], height=int(fig2.layout.height))
    paths["config"].write_text(json.dumps(config, indent=2, default=str) + "\n")
    return paths


def bench_figures(df: Any) -> tuple[Any, Any]:
    """The ratio-to-floor and time-per-call charts of a bench table: one panel per d (columns)
    and device (rows), one colour per method series (48 distinct before any repeats), dashes
    per implementation, log y axes with plain powers of ten."""
    import plotly.express as px

    timed = df[df["median_ms"].notna()].copy()
    timed["series"] = timed["method"] + timed["impl"].map(
        {"torchjd": " (TorchJD)", "floor": "", "mtl_opt": "", "mtl_opt_many": ""})
    timed["d"] = timed["d"].map(_power_of_ten)
    series = sorted(timed["series"].unique())
    palette = px.colors.qualitative.Dark24 + px.colors.qualitative.Light24
    common = dict(x="K", color="series", line_dash="impl", facet_col="d", facet_row="device",
                  markers=True, log_y=True, hover_data=["median_ms", "min_ms", "max_ms", "ratio_to_floor"],
                  category_orders={"series": series},
                  color_discrete_map={s: palette[i % len(palette)] for i, s in enumerate(series)},
                  labels={"K": "K (tasks)", "series": "method", "impl": "implementation"})
    height = 420 * max(1, timed["device"].nunique()) + 140
    fig = px.line(timed, y="ratio_to_floor", title="Time per call / floor (G Gᵀ + wᵀG), median", **common)
    fig.add_hline(y=1.3, line_dash="dot", annotation_text="1.3 × floor")
    fig2 = px.line(timed, y="median_ms", title="Time per call (median)", **common)
    for f, label in ((fig, "time / floor (ratio)"), (fig2, "time per call (ms)")):
        f.update_yaxes(exponentformat="power", title_text=None)
        f.update_yaxes(title_text=label, col=1)
        f.update_xaxes(tickvals=sorted(int(k) for k in timed["K"].unique()))  # whole task counts only
        f.update_layout(height=height)
    return fig, fig2


def _power_of_ten(v: float) -> str:
    """``10000.0`` -> ``"10⁴"``, ``2e6`` -> ``"2·10⁶"`` (facet labels read ``d = 10⁴``)."""
    sup = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
    mantissa, exponent = f"{float(v):.0e}".split("e")
    power = f"10{str(int(exponent)).translate(sup)}"
    return power if mantissa == "1" else f"{mantissa}·{power}"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _size(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive integer such as 1e6, got {text!r}")
    return int(value)


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mtl-opt bench``."""
    add_methods_argument(parser, default_text="every registered method")
    parser.add_argument("--K", nargs="+", type=_size, default=list(DEFAULT_K), help="numbers of tasks (default 2 4 8 16)")
    parser.add_argument("--d", nargs="+", type=_size, default=list(DEFAULT_D),
                        help="numbers of parameters (default 1e4 1e6 1e7)")
    parser.add_argument("--device", nargs="+", default=["auto"],
                        help="cpu, cuda, cuda:1 ... or auto (cpu, plus cuda when available; default)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--max-jacobian-mb", type=float, default=None,
                        help="skip sizes whose G (float32) is larger than this many MiB")
    parser.add_argument("--no-torchjd", action="store_true", help="do not run the TorchJD comparison")
    parser.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--no-many", action="store_true", help="do not time aggregate_many over all methods")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random Jacobians (default 0)")
    parser.add_argument("--sequential", action="store_true",
                        help="time each implementation's calls back to back instead of interleaving "
                             "one call of each per round (warm caches; less robust to load)")
    add_out_argument(parser, prefix="bench")


def run(args: argparse.Namespace) -> int:
    """``mtl-opt bench``: time every method, write CSV, Markdown, plotly HTML and the config."""
    import mtl_opt

    devices: list[str] = []
    for dev in args.device:
        if dev == "auto":
            devices += ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        else:
            devices.append(dev)
    devices = list(dict.fromkeys(devices))
    methods = parse_methods(args.methods) or mtl_opt.available_aggregators()
    mb = args.max_jacobian_mb
    if mb is not None and not (math.isfinite(mb) and mb > 0):
        raise ValueError(f"--max-jacobian-mb must be a finite number > 0, got {mb}")
    max_bytes = None if mb is None else max(1, int(mb * 2**20))
    for option, value, low in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                               ("--threads", args.threads, 1), ("--seed", args.seed, 0)):
        if value < low:
            raise ValueError(f"{option} must be >= {low}, got {value}")
    check_options(methods, Ks=args.K, ds=args.d, devices=devices, repeats=args.repeats,
                  warmup=args.warmup, threads=args.threads, max_jacobian_bytes=max_bytes, seed=args.seed)
    # claimed once every option is checked, before the timings
    with claim_out(args.out, prefix="bench", command="mtl-opt bench") as folder:
        return _bench(args, methods, devices, max_bytes, folder.path)


def _bench(args: argparse.Namespace, methods: list[str], devices: list[str], max_bytes: int | None,
           out: Path) -> int:
    rows = run_benchmark(methods, Ks=args.K, ds=args.d, devices=devices, repeats=args.repeats,
                         warmup=args.warmup, threads=args.threads, torchjd=not args.no_torchjd,
                         memory=not args.no_memory, many=not args.no_many,
                         max_jacobian_bytes=max_bytes, seed=args.seed, interleave=not args.sequential)
    config = {
        "command": "mtl-opt bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "mtl-opt bench",
        "methods": methods, "K": args.K, "d": args.d, "devices": devices, "repeats": args.repeats,
        "warmup": args.warmup, "threads": args.threads, "torchjd": not args.no_torchjd,
        "memory": not args.no_memory, "seed": args.seed, "interleave": not args.sequential,
        "environment": environment_stamp(),
        "floor": "G @ G.T plus w @ G on the same G (float32), same run",
    }
    paths = write_outputs(rows, out, config)
    print(f"wrote {paths['csv']}, {paths['md']}, {paths['ratio_html']}, {paths['time_html']}, {paths['config']}")
    return 0
