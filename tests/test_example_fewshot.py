"""examples/fewshot_digits.py: the episode sampler, a smoke run of every method, and bad input."""
import math
import os
import sys

import pytest
import torch
pytest.importorskip("sklearn")  # optional here (e.g. a GPU machine without it): skipped, not failed
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import _fewshot_data as data  # noqa: E402
import fewshot_digits as fs  # noqa: E402


@pytest.fixture(scope="module")
def pools():
    return data.load_class_pool("train"), data.load_class_pool("test")


def test_pools_split_by_digit(pools):
    train, test = pools
    assert (train.num_classes, test.num_classes) == (20, 14)
    digits = lambda pool: {name.split("@")[0] for name in pool.names}  # noqa: E731
    assert digits(train) == set("012345") and digits(test) == set("6789")
    # Digits that look the same upside down keep only their 0 and 90 degree rotations.
    assert [n for n in train.names + test.names if n.startswith(("0@", "1@", "8@"))] == \
        ["0@0", "0@90", "1@0", "1@90", "8@0", "8@90"]
    for pool in pools:
        for imgs in pool.images:
            assert imgs.shape[1:] == (1, 8, 8) and imgs.shape[0] >= 170
            assert 0.0 <= float(imgs.min()) and float(imgs.max()) <= 1.0
    # A rotated class really is the rotation of its digit.
    six, six_90 = test.images[test.names.index("6@0")], test.images[test.names.index("6@90")]
    torch.testing.assert_close(torch.rot90(six, 1, dims=(2, 3)), six_90)


def _class_of(image, pool):
    hits = [c for c, imgs in enumerate(pool.images) if bool((imgs == image).flatten(1).all(1).any())]
    assert hits, "episode image not found in the pool"
    return hits


def test_episodes_shapes_labels_and_classes(pools):
    _, test = pools
    gen = torch.Generator().manual_seed(0)
    (xs, ys), (xq, yq) = data.sample_episodes(test, 3, 4, 2, 3, gen)
    assert xs.shape == (3, 8, 1, 8, 8) and xq.shape == (3, 12, 1, 8, 8)
    assert ys.dtype == torch.int64 and ys[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert yq[1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    first_labels = []
    for t in range(3):
        classes = []
        for k in range(4):
            # Every support and query image of label k comes from one class of the pool.
            candidates = set(_class_of(xs[t, 2 * k], test))
            for img in list(xs[t, 2 * k:2 * k + 2]) + list(xq[t, 3 * k:3 * k + 3]):
                candidates &= set(_class_of(img, test))
            assert candidates
            classes.append(candidates)
        # ... and the labels name different classes.
        assert all(not (a & b) for i, a in enumerate(classes) for b in classes[i + 1:])
        first_labels.append(min(classes[0]))
    # The label order is random across tasks.
    xs2 = data.sample_episodes(test, 20, 5, 1, 1, torch.Generator().manual_seed(1))[0][0]
    assert len({min(_class_of(xs2[t, 0], test)) for t in range(20)}) > 1


def test_episode_bad_input(pools):
    train, test = pools
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="n_way=15 exceeds the 14 classes"):
        data.sample_episodes(test, 1, 15, 1, 15, gen)
    with pytest.raises(ValueError, match="k_shot must be >= 1"):
        data.sample_episodes(train, 1, 5, 0, 15, gen)
    with pytest.raises(ValueError, match="k_shot \\+ n_query = 200 exceeds"):
        data.sample_episodes(train, 1, 5, 100, 100, gen)
    with pytest.raises(TypeError, match="n_way must be an int"):
        data.sample_episodes(train, 1, 5.0, 1, 15, gen)
    with pytest.raises(ValueError, match="split must be"):
        data.load_class_pool("val")


@pytest.mark.parametrize("argv, message", [
    (["--ways", "15"], "--ways 15 exceeds the 14 classes of the meta-test split"),
    (["--ways", "1"], "--ways must be >= 2"),
    (["--shots", "0"], "--shots must be >= 1"),
    (["--shots", "5", "--query", "200"], "exceeds the smallest meta-train class"),
    (["--inner-lr", "-1"], "--inner-lr must be finite and > 0"),
    (["--methods", "matching"], "invalid choice"),
    (["--smoke"], "--smoke needs --out"),
    (["--train-class-episodes", "-1"], "--train-class-episodes must be >= 0"),
])
def test_cli_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        fs.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_smoke_run_every_method(tmp_path, capsys):
    torch.set_num_threads(1)
    rows = fs.main(["--smoke", "--shots", "5", "--train-class-episodes", "20", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert [r["method"] for r in rows] == list(fs.METHODS)
    for r in rows:
        assert 0.0 <= r["acc"] <= 1.0 and math.isfinite(r["acc"]), r
        assert math.isfinite(r["ci95"]) and 0.0 <= r["ci95"] < 0.5, r
        assert r["train_s"] > 0 and math.isfinite(r["last_loss"]), r
        assert 0.0 <= r["train_class_acc"] <= 1.0, r
        assert fs.LABELS[r["method"]] in out
    # The figure went to --out (not to docs/figures) and is a PNG.
    with open(tmp_path / "fewshot_digits.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "5-way 5-shot acc %" in out and "train-class 5-shot %" in out

    # 5-way 5-shot on unseen digits: the best method is far above chance (20%) ...
    best = max(rows, key=lambda r: r["acc"])
    assert best["acc"] > 0.6, rows
    # ... and meta-training is what got it there: the same learner before meta-training, on the
    # same meta-test episodes, is worse (random conv features already beat chance on digits).
    cfg = fs.config_from_args(["--smoke", "--shots", "5", "--out", str(tmp_path)])
    episodes = fs.meta_test_episodes(data.load_class_pool("test"), cfg, 5)
    torch.manual_seed(cfg.seed)
    untrained = fs.mean_ci95(fs.meta_test(fs.make_learner(best["method"], cfg), episodes))[0]
    assert best["acc"] > untrained + 0.03, (best, untrained)
    # The query loss went down while meta-training for most methods.
    assert sum(r["last_loss"] < r["first_loss"] for r in rows) >= 5, rows
