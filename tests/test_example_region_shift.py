"""examples/region_shift.py: the smoke run works and says something, bad command lines are refused."""
from __future__ import annotations

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
SCRIPT = os.path.join(ROOT, "examples", "region_shift.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("region_shift_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    threads = torch.get_num_threads()
    try:
        return example.main(["--smoke", "--out", str(out)]), out
    finally:
        torch.set_num_threads(threads)


def test_smoke_accuracies_are_probabilities(example, smoke):
    res, _ = smoke
    values = list(res["shots"].values()) + list(res["extrapolation"].values())
    assert set(res["shots"]) == {(m, k) for m in example.METHODS for k in (0, 1, 2, 5)}
    for mag in res["magnitudes"]:
        for name in ("pretrain, re-tuned", "MAML, re-tuned", "pretrain, 0 shots", "MAML, 0 shots"):
            assert (name, mag) in res["extrapolation"]
    for mean, ci in values:
        assert math.isfinite(mean) and 0.0 <= mean <= 1.0
        assert math.isfinite(ci) and ci >= 0.0


def test_smoke_adaptation_helps(example, smoke):
    res, _ = smoke
    shots = res["shots"]
    maml0, maml5 = shots["MAML + adapt", 0], shots["MAML + adapt", 5]
    rand0 = shots["random init", 0]
    # five labelled pixels per class lift MAML's initialization by far more than the noise
    assert maml5[0] - maml5[1] > maml0[0] + maml0[1] + 0.2
    assert maml5[0] > rand0[0] + 0.4
    # an untrained network is at chance (6 classes); the pooled model is well above it
    assert abs(rand0[0] - 1 / 6) < 0.1
    assert shots["pretrain + fine-tune", 0][0] > 0.4


def test_smoke_writes_figures_to_out_only(smoke):
    res, out = smoke
    names = sorted(os.path.basename(p) for p in res["figures"])
    assert names == ["region_shift_extrapolation.png", "region_shift_shots.png", "region_shift_spectra.png"]
    for p in res["figures"]:
        assert os.path.dirname(p) == str(out) and os.path.getsize(p) > 1000


def test_world_is_deterministic_and_rotation_moves_classes(example):
    world = example.SpectralWorld(0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    angles = torch.tensor([0.0, math.pi / 3])
    x1, y1 = world.sample(world.regions(angles, g1), 5, g1)
    x2, _ = world.sample(world.regions(angles, g2), 5, g2)
    assert x1.shape == (2, 6, 5, 13) and y1.shape == (2, 6, 5)
    torch.testing.assert_close(x1, x2)
    # without offsets, gains and noise, a 60-degree region shows class c where class c+1 sits in a
    # 0-degree region in the appearance plane (the first two latent coordinates), and only there
    quiet = example.SpectralWorld(0, class_noise=0.0, offset_noise=0.0, gain_noise=0.0, band_noise=0.0)
    g = torch.Generator().manual_seed(0)
    x, _ = quiet.sample(quiet.regions(angles, g), 1, g)                      # [2, 6, 1, 13]
    z = torch.linalg.lstsq(quiet.basis.expand(2, -1, -1), (x[:, :, 0] - 1.0).transpose(1, 2)).solution.transpose(1, 2)
    torch.testing.assert_close(z[1, :, :2], z[0].roll(-1, 0)[:, :2], atol=1e-4, rtol=0)
    torch.testing.assert_close(z[1, :, 2:], z[0, :, 2:], atol=1e-4, rtol=0)
    assert (z[1, :, :2] - z[0, :, :2]).abs().max() > 0.5


@pytest.mark.parametrize("argv, name", [
    (["--shots", "-1"], "--shots"),
    (["--train-angle", "0"], "--train-angle"),
    (["--max-angle", "30"], "--max-angle"),
    (["--test-tasks", "0"], "--test-tasks"),
    (["--pool", "10"], "--pool"),
])
def test_bad_arguments_raise_naming_the_option(example, argv, name):
    with pytest.raises(ValueError, match=name):
        example.main(argv)


def test_cli_rejects_bad_input_with_a_message():
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--inner-lr", "-0.1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "--inner-lr" in proc.stderr and "ValueError" in proc.stderr


def test_out_must_be_a_folder(example, tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="--out"):
        example.main(["--smoke", "--out", str(f)])


def test_fine_tuning_loop_matches_fastmaml_adapt(example):
    from fastmaml.meta import adapt

    net = example.make_net(0, 13, 6, 16).double()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(5, 12, 13, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 6, (5, 12), generator=g)
    tm, phi0 = example.initial_weights([net], 5)
    phi = example.sgd_steps(tm, [p.clone() for p in phi0], (xs, ys), 0.3, 4)
    expected = adapt(tm, (xs, ys), 4, 0.3)
    for a, b in zip(phi, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert max(float((a - b).abs().max()) for a, b in zip(phi, phi0)) > 1e-3   # it moved


def test_random_init_gives_every_task_its_own_network(example):
    nets = [example.make_net(s, 13, 6, 8) for s in range(3)]
    tm, phi0 = example.initial_weights(nets, 3)
    assert all(p.shape[0] == 3 for p in phi0)
    assert not torch.equal(phi0[0][0], phi0[0][1])
    with pytest.raises(ValueError, match="nets"):
        example.initial_weights(nets, 4)
