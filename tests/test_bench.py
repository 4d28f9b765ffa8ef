"""The benchmark suite's contract: clear CLI errors, honest summaries (a failed accuracy check is never a
speed-up, a missing peer is skipped), metadata on every row, and figures from the CSVs."""
import csv
import math

import pytest
import torch

import fastmaml
from fastmaml.bench import __main__ as suite
from fastmaml.bench import heads as bench_heads
from fastmaml.bench import inner_update as bench_inner
from fastmaml.bench import plot
from fastmaml.bench.summary import format_lines, summarize


def test_cli_rejects_unknown_options_and_families(capsys):
    for argv in (["--bogus"], ["--only", "nope"], ["--quick", "--full"]):
        with pytest.raises(SystemExit) as exc:
            suite.parse_args(argv)
        assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_refuses_cuda_without_a_device(capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(["--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err


def test_impossible_sizes_are_refused_before_allocating(capsys):
    with pytest.raises(SystemExit):
        bench_inner.main(["--tasks", "100000000"])
    assert "needs about" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_inner.main(["--tasks", "0"])
    assert "--tasks must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_heads.main(["--families", "ridge,bogus"])
    assert "unknown ['bogus']" in capsys.readouterr().err


def test_a_real_inner_update_run_checks_accuracy_and_stamps_every_row():
    rows = bench_inner.run(tasks=(3,), forms=("scalar", "meta_sgd"), repeats=2, quiet=True)
    assert rows and all(r["check"] == "ok" for r in rows)
    for key in ("date", "commit", "device", "torch", "fastmaml", "python"):
        assert all(r[key] for r in rows), key
    lines = summarize({"inner_update": rows})
    assert len(lines) == 2  # scalar form, out of place and in place
    assert all(ln["check"] == "ok" and math.isfinite(ln["speedup"]) for ln in lines)


def _meta_row(provider, check, median, speedup, **kw):
    return {"workload": "A", "tasks": 8, "steps": 5, "provider": provider, "median_ms": median, "check": check,
            "speedup_vs_fastest_baseline": speedup, "fastest_baseline": "loop_autograd", "peak_extra_mb": 10.0, **kw}


def test_a_failed_accuracy_check_is_never_reported_as_a_speed_up():
    rows = [_meta_row("loop_autograd", "ok", 100.0, 1.0), _meta_row("fastmaml_exact", "FAILED", 10.0, float("nan"))]
    (line,) = summarize({"meta": rows})
    assert line["check"] == "FAILED" and math.isnan(line["speedup"])
    assert "FAILED" in format_lines([line]) and "10.00x" not in format_lines([line])
    # the same when the family itself computed a ratio before the check was applied
    rows[1]["speedup_vs_fastest_baseline"] = 10.0
    (line,) = summarize({"meta": rows})
    assert math.isnan(line["speedup"])


def test_svm_group_marks_inaccurate_fastmaml_rows_failed_and_drops_every_ratio():
    group = [{"provider": "fastmaml", "median_ms": 1.0, "rel_err": 1e-2},
             {"provider": "qpth_maxIter3", "median_ms": 5.0, "rel_err": 1e-5}]
    bench_heads._mark_svm_group(group)
    assert group[0]["check"] == "FAILED" and "speedup" not in group[1]
    group = [{"provider": "fastmaml", "median_ms": 1.0, "rel_err": 1e-7},
             {"provider": "qpth_maxIter3", "median_ms": 5.0, "rel_err": 0.5}]
    bench_heads._mark_svm_group(group)
    assert group[0]["check"] == "ok" and group[1]["check"] == "low accuracy" and group[1]["speedup"] == 5.0


def test_missing_peers_are_reported_as_skipped_not_timed(monkeypatch):
    monkeypatch.setattr(bench_heads, "have_module", lambda name: name != "qpth")
    rows = bench_heads.skipped_peer_rows({}, family="svm_qp", mode="fwd+bwd", tasks=8, shot=1, features=1600)
    assert [r["provider"] for r in rows] == ["qpth"]
    assert rows[0]["check"] == "skipped" and rows[0]["median_ms"] == "" and "not installed" in rows[0]["note"]
    fast = {"family": "svm_qp", "mode": "fwd+bwd", "tasks": 8, "shot": 1, "features": 1600, "provider": "fastmaml",
            "median_ms": 2.0, "rel_err": 1e-7, "check": "ok"}
    peer = dict(rows[0], provider="qpth_maxIter3")
    (line,) = summarize({"heads": [fast, peer]})
    assert line["check"].startswith("skipped") and math.isnan(line["speedup"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_every_family_refuses_cuda_without_a_device(capsys):
    from fastmaml.bench import meta as bench_meta

    for family in (bench_inner, bench_meta, bench_heads):
        with pytest.raises(SystemExit):
            family.main(["--device", "cuda"])
        assert "no CUDA device is available" in capsys.readouterr().err


def test_on_a_gpu_cpu_only_peers_are_reported_skipped(monkeypatch):
    monkeypatch.setattr(bench_heads, "have_module", lambda name: True)
    rows = bench_heads.skipped_peer_rows({}, "cuda", family="svm_qp", tasks=8)
    assert [(r["provider"], r["check"]) for r in rows] == [("cvxpylayers", "skipped")]
    assert "CPU only" in rows[0]["note"]


def test_plot_writes_figures_from_the_latest_run(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for run_id, scale in (("run1", 2.0), ("run2", 1.0)):
        for tasks in (1, 8, 32):
            for mode in ("out-of-place", "in-place"):
                for provider in ("foreach_add", "fastmaml-cpu"):
                    rows.append({"run_id": run_id, "date": "2026-01-01T00:00:00Z", "device": "cpu", "torch": "x",
                                 "commit": "abc", "lr_form": "scalar", "dtype": "float32", "mode": mode,
                                 "tasks": tasks, "provider": provider, "median_ms": scale * tasks})
    with (tmp_path / "inner_update.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert {r["run_id"] for r in plot.latest_run(plot.read_rows(tmp_path / "inner_update.csv"))} == {"run2"}
    both = plot.latest_run(plot.read_rows(tmp_path / "inner_update.csv"), ["run1", "run2"])  # several runs together
    assert {r["run_id"] for r in both} == {"run1", "run2"}
    written = plot.main(["--results", str(tmp_path), "--out", str(tmp_path / "fig")])
    assert [p.name for p in written] == ["bench_inner_update_vs_tasks.png"]
    assert written[0].stat().st_size > 10_000


def test_meta_rows_are_checked_even_without_the_loop_provider():
    from fastmaml.bench import meta as bench_meta

    rows = bench_meta.run_meta("C", 3, (1,), ("func_vmap", "fastmaml_exact"), 1, (), {})
    assert [r["check"] for r in rows] == ["ok", "ok"]
    assert all(r["err_bound"] == bench_meta.ERR_FLOOR for r in rows)


def test_an_exact_provider_off_in_float32_only_passes_on_its_float64_run(monkeypatch):
    """A float32 difference beyond the bound that vanishes in float64 (a kink's branch taken the
    other way by rounding) is ``ok (f64)`` with its speed-up; one that stays is FAILED."""
    from fastmaml.bench import meta as bench_meta
    from fastmaml.bench.summary import meta_lines

    real = bench_meta.provider_fn

    def shaken(provider, net, *args, **kwargs):
        fn = real(provider, net, *args, **kwargs)
        in_float32 = next(net.parameters()).dtype == torch.float32
        if (provider == "fastmaml_exact" and in_float32) or provider == "func_vmap":
            return lambda: [g * 1.01 for g in fn()]
        return fn

    monkeypatch.setattr(bench_meta, "provider_fn", shaken)
    rows = {r["provider"]: r for r in bench_meta.run_meta("C", 3, (1,), ("loop_autograd", "func_vmap",
                                                                          "fastmaml_exact"), 1, (), {})}
    ours, vmapped = rows["fastmaml_exact"], rows["func_vmap"]
    assert ours["rel_err_vs_f64"] > 5e-3 and ours["f64_rel_err"] < 1e-8 and ours["check"] == "ok (f64)"
    assert ours["speedup_vs_fastest_baseline"] > 0
    assert vmapped["check"] == "FAILED" and math.isnan(vmapped["speedup_vs_fastest_baseline"])
    assert vmapped["f64_rel_err"] > 5e-3
    line = next(ln for ln in meta_lines(list(rows.values())) if ln["case"] == "workload C T=3 K=1")
    assert line["check"] == "ok (f64)" and line["speedup"] > 0


def test_flop_count_of_a_matmul_is_two_m_n_k():
    from fastmaml.bench._common import counted_gflop

    a, b = torch.randn(30, 40), torch.randn(40, 50)
    out, gflop = counted_gflop(lambda: a @ b)
    torch.testing.assert_close(out, a @ b)
    assert gflop == pytest.approx(2 * 30 * 40 * 50 / 1e9)


def test_meta_rows_report_flops_against_the_fastest_baseline():
    from fastmaml.bench import meta as bench_meta

    rows = {r["provider"]: r for r in bench_meta.run_meta("C", 3, (1,), ("func_vmap", "fastmaml_exact"), 1, (), {})}
    base, ours = rows["func_vmap"], rows["fastmaml_exact"]
    assert base["gflop"] > 0 and ours["gflop"] > 0
    assert base["flop_speedup"] == pytest.approx(1.0)  # the only baseline is the fastest one
    assert ours["flop_speedup"] == pytest.approx(base["gflop"] / ours["gflop"])


def test_grouped_convolution_backward_is_counted_per_group():
    # T per-task convolutions run as one grouped convolution (what vmap does) are the same work
    # as one convolution over a T times larger batch; torch's own formula counts the grouped
    # weight gradient T times
    import torch.nn.functional as F
    from fastmaml.bench._common import counted_gflop

    T = 4
    xg = torch.randn(3, T * 8, 6, 6, requires_grad=True)
    wg = torch.randn(T * 8, 8, 3, 3, requires_grad=True)
    xd = torch.randn(3 * T, 8, 6, 6, requires_grad=True)
    wd = torch.randn(8, 8, 3, 3, requires_grad=True)
    _, grouped = counted_gflop(lambda: F.conv2d(xg, wg, padding=1, groups=T).sum().backward())
    _, dense = counted_gflop(lambda: F.conv2d(xd, wd, padding=1).sum().backward())
    assert grouped == pytest.approx(dense) and dense > 0


def test_no_cache_rows_are_a_fastmaml_variant_never_a_baseline():
    rows = bench_heads.bench_ridge({}, [(2, 3, 2, 5, 64)], repeats=1, memory=False)
    by = {r["provider"]: r for r in rows}
    assert {"fastmaml", "fastmaml_no_cache"} <= set(by)
    assert by["fastmaml"]["speedup_vs"] in ("linalg_solve", "cholesky_solve")
    assert by["fastmaml_no_cache"]["speedup_vs"] == by["fastmaml"]["speedup_vs"]
    lines = [ln for ln in summarize({"heads": rows}) if ln["family"] == "heads"]
    assert [ln["case"].endswith("(no buffer cache)") for ln in lines] == [False, True]
    assert all(ln["baseline"] in ("linalg_solve", "cholesky_solve") for ln in lines)


def test_thin_product_rows_compare_the_kernel_with_bmm():
    rows = bench_heads.bench_products({}, [(2, 7, 40, 3)], repeats=1)
    assert [(r["mode"], r["provider"]) for r in rows] == [("nt", "fastmaml"), ("nt", "bmm"), ("tn", "fastmaml"),
                                                          ("tn", "bmm")]
    assert all(r["check"] == "ok" and r["rel_err"] < 1e-5 for r in rows)
    lines = summarize({"heads": rows})
    assert [ln["case"] for ln in lines] == ["task_matmul_nt T=2 m=7 d=40 c=3", "task_matmul_tn T=2 m=7 d=40 c=3"]
    assert all(ln["baseline"] == "bmm" and ln["speedup"] > 0 for ln in lines)


@pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")
def test_layer_rows_compare_the_kernels_with_torchs_ops(monkeypatch):
    from fastmaml.bench import meta as bench_meta
    from fastmaml.bench.summary import summarize

    monkeypatch.setattr(bench_meta, "FIRST_CONV_SHAPES", (((2, 1, 8, 8), 4),))
    rows = bench_meta.run_layers(((3, 4, 10, 12),), 1, {})
    modes = {"max_pool 2x2": ("forward", "fwd+bwd"), "relu": ("forward", "fwd+bwd"),
             "batch_norm train": ("forward", "fwd+bwd", "double bwd"), "first conv": ("fwd+bwd", "double bwd"),
             "batch_norm + max_pool (one layer)": ("backward", "jvp", "R-op backward")}
    assert {(r["op"], r["mode"], r["provider"]) for r in rows} == {
        (op, mode, p) for op, ms in modes.items() for mode in ms for p in ("torch", "fastmaml")}
    assert all(r["check"] == "ok" for r in rows)
    merged = [r for r in rows if r["op"] == "batch_norm + max_pool (one layer)" and r["provider"] == "fastmaml"]
    assert len(merged) == 3 and all(r["max_rel_diff"] <= 1e-10 for r in merged)  # compared in float64
    exact = [r for r in rows if r["op"] not in ("batch_norm train", "batch_norm + max_pool (one layer)")]
    assert all(r["max_rel_diff"] == 0.0 for r in exact)  # max-pool, relu, first conv: exact, not close
    bn = [r for r in rows if r["op"] == "batch_norm train" and r["provider"] == "fastmaml"]
    assert len(bn) == 3 and all(r["max_rel_diff"] <= 1e-5 for r in bn)  # float32, sums in another order
    saved = {(r["op"], r["provider"]): r["saved_mb"] for r in rows if r["mode"] == "forward"}
    assert saved[("relu", "fastmaml")] < saved[("relu", "torch")] / 8  # bits instead of floats
    assert saved[("max_pool 2x2", "fastmaml")] < saved[("max_pool 2x2", "torch")]
    lines = [line for line in summarize({"meta": rows}) if "bwd" in line["case"]]
    assert [line["case"].split(" ")[0] for line in lines] == ["max_pool", "relu", "batch_norm", "batch_norm", "first",
                                                              "first"]
    assert all(line["baseline"] == "torch" for line in lines)


@pytest.mark.parametrize("argv, message", [(["--tasks", "0"], "--tasks must be >= 1"),
                                           (["--steps", "0"], "--steps must be >= 1")])
def test_meta_cli_refuses_bad_counts_naming_them(capsys, argv, message):
    from fastmaml.bench import meta as bench_meta
    with pytest.raises(SystemExit):
        bench_meta.main(["--workload", "A"] + argv)
    assert message in capsys.readouterr().err
