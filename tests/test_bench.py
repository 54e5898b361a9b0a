"""``mtl-opt bench`` end to end at tiny sizes: outputs, documented columns, floor and ratios.

No assertion here depends on how fast anything runs.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import mtl_opt
from mtl_opt.cli import main
from mtl_opt.experiments import bench

pd = pytest.importorskip("pandas")


def _torchjd_importable() -> bool:
    try:
        import torchjd.aggregation  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--K", "2", "3", "--d", "64", "1e3", "--repeats", "3", "--warmup", "1",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    return out, pd.read_csv(out / "bench.csv")


def test_writes_every_output_with_the_documented_columns(small_run):
    out, df = small_run
    assert tuple(df.columns) == bench.COLUMNS
    for name in ("bench.csv", "bench.md", "ratio_to_floor.html", "time_ms.html", "config.json"):
        assert (out / name).stat().st_size > 0, name
    assert "plotly" in (out / "ratio_to_floor.html").read_text()
    md = (out / "bench.md").read_text()
    assert md.count("\n| cpu |") == len(df)
    config = json.loads((out / "config.json").read_text())
    assert config["K"] == [2, 3] and config["d"] == [64, 1000] and config["repeats"] == 3
    assert config["threads"] == 1 and config["environment"]["torch"] == torch.__version__


def test_one_floor_and_one_row_per_method_per_size(small_run):
    _, df = small_run
    methods = mtl_opt.available_aggregators()
    for (K, d), group in df.groupby(["K", "d"]):
        ours = group[group.impl == "mtl_opt"]
        assert sorted(ours.method) == sorted(methods)
        assert (group.impl == "floor").sum() == 1
        assert (group.impl == "mtl_opt_many").sum() == 1
        assert ours.median_ms.notna().all(), ours[ours.median_ms.isna()].note.tolist()
    assert sorted(df.K.unique()) == [2, 3] and sorted(df.d.unique()) == [64, 1000]


def test_floor_and_ratio_columns_are_computed_as_documented(small_run):
    _, df = small_run
    for _, group in df.groupby(["device", "K", "d"]):
        floor = group[group.impl == "floor"].iloc[0]
        assert floor.ratio_to_floor == pytest.approx(1.0)
        timed = group[group.median_ms.notna()]
        assert (timed.floor_ms == floor.median_ms).all()
        assert ((timed.median_ms / timed.floor_ms) - timed.ratio_to_floor).abs().max() < 1e-9
        assert ((timed.min_ms <= timed.median_ms) & (timed.median_ms <= timed.max_ms)).all()
        assert (timed.repeats == 3).all()
        assert (timed.peak_mem_bytes.dropna() >= 0).all()


@pytest.mark.skipif(not _torchjd_importable(), reason="torchjd is not installed (pip install 'mtl-opt[bench]')")
def test_torchjd_rows_match_ours_and_agree_in_direction(small_run):
    _, df = small_run
    for _, group in df.groupby(["K", "d"]):
        ours = group[group.impl == "mtl_opt"].set_index("method")
        ref = group[group.impl == "torchjd"].set_index("method")
        # Every method with a TorchJD equivalent was compared (cvxpy/ECOS-backed ones included).
        expected = {m for m in ours.index if m in bench.TORCHJD_EQUIVALENTS}
        assert set(ref.index) == expected
        for m in expected:
            assert ours.loc[m, "torchjd_ms"] == ref.loc[m, "median_ms"]
            assert ours.loc[m, "speedup_vs_torchjd"] == pytest.approx(ref.loc[m, "median_ms"] / ours.loc[m, "median_ms"])
            assert isinstance(ref.loc[m, "reference"], str) and ref.loc[m, "reference"]
        # Same method, same Jacobian: the directions agree (scale conventions aside).
        for m in ("ls", "mgda", "nash_mtl"):
            if m in ref.index:
                assert ref.loc[m, "cosine_vs_torchjd"] > 0.99, m
        for m in set(ours.index) - expected:
            assert "no TorchJD equivalent" in ours.loc[m, "note"]


def test_torchjd_missing_is_reported_not_hidden(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchjd", None)  # makes `import torchjd` raise ImportError
    rows = bench.run_benchmark(["ls"], Ks=[2], ds=[16], repeats=1, warmup=0, memory=False, many=False)
    assert "torchjd not importable" in capsys.readouterr().out
    ours = [r for r in rows if r["impl"] == "mtl_opt"]
    assert ours and all("torchjd not importable" in r["note"] for r in ours)
    assert not [r for r in rows if r["impl"] == "torchjd"]


@pytest.mark.parametrize("interleave", [True, False])
def test_method_specs_and_size_limit(interleave):
    said = []
    rows = bench.run_benchmark(["cagrad:c=0.5", "ls"], Ks=[2, 4], ds=[8, 32], repeats=2, warmup=0,
                               torchjd=False, memory=False, max_jacobian_bytes=4 * 2 * 32,
                               interleave=interleave, progress=said.append)
    assert all(r["repeats"] == 2 for r in rows)
    sizes = {(r["K"], r["d"]) for r in rows}
    assert sizes == {(2, 8), (2, 32), (4, 8)}  # 4 × 32 float32 is over the limit
    assert any("skipped" in s for s in said)
    assert {r["method"] for r in rows if r["impl"] == "mtl_opt"} == {"cagrad:c=0.5", "ls"}


def test_bad_options_fail_with_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--d", "0", "--out", str(tmp_path)])
    assert main(["bench", "--methods", "no_such_method", "--K", "2", "--d", "8",
                 "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--methods", "ls", "--K", "2", "--d", "8",
                     "--out", str(tmp_path)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_time_call_counts_calls_and_measures_each():
    calls = []
    t = bench.time_call(lambda: calls.append(1), torch.device("cpu"), repeats=5, warmup=2)
    assert len(calls) == 7 and len(t.times_s) == 5
    assert all(x >= 0 for x in t.times_s) and t.min_ms <= t.median_ms <= t.max_ms


def test_make_jacobian_is_reproducible_and_has_conflicts():
    G1 = bench.make_jacobian(4, 3000, torch.device("cpu"), seed=3)
    G2 = bench.make_jacobian(4, 3000, torch.device("cpu"), seed=3)
    assert G1.shape == (4, 3000) and G1.dtype == torch.float32
    assert torch.equal(G1, G2)
    M = G1.double() @ G1.double().T
    assert (M < 0).any()  # some pair of tasks conflicts
    norms = M.diagonal().sqrt()
    assert float(norms.max() / norms.min()) > 2  # unequal norms


@pytest.mark.skipif(not bench._rss_peak_supported(), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_sees_a_fresh_allocation():
    assert bench._fix_glibc_mmap_threshold()
    n = 4 * 2**20  # 16 MiB of float32
    peak = bench.measure_peak_memory(lambda: torch.ones(n), torch.device("cpu"))
    assert peak is not None and peak >= 0.9 * 4 * n
    assert math.isfinite(peak)


@pytest.mark.parametrize("args, message", [
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--max-jacobian-mb", "-1"], "--max-jacobian-mb must be a finite number > 0"),
    (["--max-jacobian-mb", "nan"], "--max-jacobian-mb must be a finite number > 0"),
    (["--max-jacobian-mb", "1e-9"], "nothing would be timed"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--methods", "ls:weights=[1,2]"], None),  # a valid spec: built and timed
    (["--methods", "came_grad:nu=2"], "nu must be <= 1.0"),
])
def test_bench_checks_every_option_before_any_work(tmp_path, capsys, args, message):
    from mtl_opt.cli import main

    out = tmp_path / "bench"
    base = ["bench", "--K", "2", "--d", "1e3", "--device", "cpu", "--repeats", "1", "--warmup", "0",
            "--no-torchjd", "--no-memory", "--no-many", "--methods", "ls"]
    code = main([*base, *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    if message is None:
        assert code == 0 and (out / "bench.csv").is_file()
        return
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_peak_memory_is_not_hidden_by_memory_freed_earlier(tmp_path):
    """The timing pass frees large tensors into glibc's heap; the memory pass must still see
    each call's fresh allocation (its d-long direction at least), not the reused pages (0)."""
    import subprocess
    import sys

    code = (
        "import sys, pandas as pd\nfrom mtl_opt.cli import main\n"
        "assert main(['bench', '--K', '8', '--d', '1e6', '--methods', 'mgda', 'cagrad', '--repeats', '2',"
        " '--warmup', '1', '--device', 'cpu', '--no-torchjd', '--no-many', '--out', sys.argv[1]]) == 0\n"
        "print(pd.read_csv(sys.argv[1] + '/bench.csv')['peak_mem_bytes'].min())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) >= 0.9 * 4 * 10**6  # the float32 direction
