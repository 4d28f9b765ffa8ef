"""The MAML sinusoid example (examples/sinusoid_maml.py): tasks, batched fine-tuning, smoke run, CLI errors."""
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
pytest.importorskip("matplotlib")  # optional here (e.g. a GPU machine without it): skipped, not failed
pytest.importorskip("tqdm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "sinusoid_maml.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("sinusoid_maml_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tasks_follow_the_paper_distribution(example):
    gen = torch.Generator().manual_seed(3)
    amplitude, phase = example.sample_tasks(500, gen)
    assert amplitude.shape == phase.shape == (500,)
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    x, y = example.sample_points(amplitude, phase, 7, gen)
    assert x.shape == y.shape == (500, 7, 1)
    assert -5.0 <= x.min() and x.max() <= 5.0
    expected = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
    torch.testing.assert_close(y, expected)
    # the draws are spread over the ranges, not stuck at a point
    assert amplitude.std() > 1.0 and phase.std() > 0.5 and x.std() > 2.0


def test_finetune_curve_matches_adapt_and_a_per_task_loop(example):
    """The in-place batched fine-tuning equals fastmaml.meta.adapt and plain per-task SGD."""
    from fastmaml.meta import TaskModel, adapt
    from fastmaml.meta.models import mse_loss, sinusoid_mlp

    torch.manual_seed(0)
    net = sinusoid_mlp()
    gen = torch.Generator().manual_seed(1)
    amplitude, phase = example.sample_tasks(6, gen)
    support = example.sample_points(amplitude, phase, 5, gen)
    query = example.sample_points(amplitude, phase, 9, gen)
    curve, snapshots = example.finetune_curve(net, support, query, 3, 0.05)
    assert curve.shape == (4, 6) and len(snapshots) == 4

    phi3 = adapt(TaskModel(net, mse_loss), support, 3, 0.05)
    for got, want in zip(snapshots[3], phi3):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # task 4 by hand: three SGD steps on its support set, then its query MSE
    params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    xs, ys, xq, yq = support[0][4], support[1][4], query[0][4], query[1][4]

    def forward(ps, x):
        h = torch.relu(x @ ps[0].T + ps[1])
        h = torch.relu(h @ ps[2].T + ps[3])
        return h @ ps[4].T + ps[5]

    for k in range(3):
        grads = torch.autograd.grad(((forward(params, xs) - ys) ** 2).mean(), params)
        params = [(p - 0.05 * g).detach().requires_grad_(True) for p, g in zip(params, grads)]
    with torch.no_grad():
        want = ((forward(params, xq) - yq) ** 2).mean()
    torch.testing.assert_close(curve[3, 4], want, rtol=1e-5, atol=1e-6)


def test_smoke_run_adapts_and_is_finite(example, tmp_path):
    out = tmp_path / "figs"
    res = example.main(["--smoke", "--no-progress", "--out", str(out)])
    assert res["shots"] == [5, 10]
    for (name, shots), curve in res["curves"].items():
        assert curve.shape == (11, 20)
        assert torch.isfinite(curve).all(), (name, shots)
    for name, shots, steps, mean, half in res["table"]:
        assert math.isfinite(mean) and math.isfinite(half) and half > 0
    for shots in (5, 10):
        before, after = res["curves"][("MAML", shots)][:2].mean(dim=1)
        assert after < before, f"K={shots}: one MAML step did not lower the test MSE ({before:.3f} -> {after:.3f})"
    for log in res["train"].values():
        assert all(math.isfinite(v) for v in log.get("query_loss", log.get("loss")))
    for path in res["figures"]:
        assert os.path.dirname(path) == str(out) and os.path.getsize(path) > 10_000


def test_short_meta_training_beats_pretraining_after_one_step(example, tmp_path):
    """The paper's qualitative result, at a small scale: after one step MAML is clearly ahead."""
    res = example.main(["--shots", "10", "--iterations", "500", "--test-tasks", "100", "--query-points", "50",
                        "--no-progress", "--out", str(tmp_path)])
    maml = res["curves"][("MAML", 10)]
    pre = res["curves"][("pretrained", 10)]
    # both start from the same weights and saw the same tasks: before adapting they are alike
    assert abs(maml[0].mean() - pre[0].mean()) < 0.1 * pre[0].mean()
    assert maml[1].mean() < 0.8 * pre[1].mean(), (maml[1].mean().item(), pre[1].mean().item())
    assert maml[1].mean() < 0.8 * maml[0].mean()
    # meta-training lowered the post-update training loss
    q = res["train"][("MAML", 10)]["query_loss"]
    assert sum(q[-50:]) / 50 < 0.8 * sum(q[:50]) / 50


@pytest.mark.parametrize("argv, flag", [
    (["--shots", "0"], "--shots"),
    (["--shots", "5", "-3"], "--shots"),
    (["--iterations", "0"], "--iterations"),
    (["--test-tasks", "1"], "--test-tasks"),
    (["--inner-lr", "-0.01"], "--inner-lr"),
    (["--meta-lr", "nan"], "--meta-lr"),
])
def test_bad_cli_arguments_exit_with_a_message_naming_the_flag(example, argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        example.main(argv + ["--smoke", "--no-progress"])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_bad_cli_argument_as_a_script(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--shots", "0", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--shots must be >= 1" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was written


def test_library_functions_reject_bad_arguments(example):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="num_tasks"):
        example.sample_tasks(0, gen)
    with pytest.raises(TypeError, match="num_points"):
        example.sample_points(torch.ones(2), torch.zeros(2), 2.5, gen)
    with pytest.raises(ValueError, match="shots"):
        example.train_maml(0, iterations=1)
    with pytest.raises(ValueError, match="inner_lr"):
        example.train_maml(5, iterations=1, inner_lr=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        example.mean_ci95(torch.ones(1))
