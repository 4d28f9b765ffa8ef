"""Reuse of freed CPU blocks inside a meta-gradient call (fastmaml.ops.block_reuse).

Inside ``reuse_cpu_blocks()`` a freed block of at least 32 KB is handed out again to a request of
its size class; kept and live blocks together stay within the scope's peak of live blocks; when
the outermost scope ends the kept blocks go back to the OS and PyTorch's allocator is back. The
engine runs its passes inside it and computes bit for bit what it computes without it.
"""
import random
import threading

import pytest
import torch
import torch.nn.functional as F

from fastmaml._extension import _C
from fastmaml.meta import maml_loss
from fastmaml.meta.models import Conv4
from fastmaml.ops.block_reuse import (block_reuse_stats, no_block_reuse, reuse_cpu_blocks, set_block_reuse_limit)

pytestmark = pytest.mark.skipif(_C is None, reason="needs the compiled module")

MB = 1 << 20


@pytest.fixture(autouse=True)
def default_limit():
    set_block_reuse_limit(1024)
    yield
    set_block_reuse_limit(1024)


def test_a_freed_block_is_handed_out_again_inside_a_scope():
    with reuse_cpu_blocks():
        assert block_reuse_stats()["active"]
        x = torch.empty(MB // 4)  # 1 MB
        ptr = x.data_ptr()
        del x
        hits = block_reuse_stats()["hits"]
        y = torch.empty(MB // 4)
        assert y.data_ptr() == ptr
        assert block_reuse_stats()["hits"] == hits + 1
        del y


def test_the_scope_ends_with_nothing_kept_and_torch_allocator_back():
    with reuse_cpu_blocks():
        for _ in range(3):
            torch.randn(MB // 4)
        assert block_reuse_stats()["cached_bytes"] > 0
    stats = block_reuse_stats()
    assert not stats["active"] and stats["depth"] == 0 and stats["cached_bytes"] == 0
    z = torch.empty(MB)  # torch's own allocator again: not one of the scope's blocks
    assert block_reuse_stats()["live_bytes"] <= stats["live_bytes"]  # (a collected cycle may free some)
    del z


def test_a_tensor_made_inside_outlives_the_scope_and_is_freed_after():
    with reuse_cpu_blocks():
        x = torch.arange(MB // 4, dtype=torch.float32)
        live_inside = block_reuse_stats()["live_bytes"]
    assert x[12345].item() == 12345.0 and x.sum().item() == float(sum(range(MB // 4)))
    del x
    stats = block_reuse_stats()
    assert stats["live_bytes"] <= live_inside - MB and stats["cached_bytes"] == 0


def test_small_requests_are_not_kept():
    with reuse_cpu_blocks():
        x = torch.empty(1000)  # 4 KB
        del x
        assert block_reuse_stats()["cached_bytes"] == 0


def test_kept_and_live_blocks_stay_within_the_peak_of_live_blocks():
    rng = random.Random(0)
    sizes = [n * 1024 for n in (40, 64, 100, 256, 300, 1000, 2048)]
    with reuse_cpu_blocks():
        held = []
        for _ in range(400):
            if held and rng.random() < 0.45:
                held.pop(rng.randrange(len(held)))
            else:
                held.append(torch.empty(rng.choice(sizes) // 4))
            s = block_reuse_stats()
            assert s["live_bytes"] + s["cached_bytes"] <= s["peak_live_bytes"]
        assert block_reuse_stats()["hits"] > 0
        del held


def test_a_request_that_finds_no_block_gives_back_as_few_kept_bytes_as_it_can():
    with reuse_cpu_blocks():
        blocks = [torch.empty(n * MB // 4) for n in (1, 2, 8)]  # peak of live blocks: 11 MB
        del blocks  # all three kept
        assert block_reuse_stats()["cached_bytes"] == 11 * MB
        other = torch.empty(3 * MB // 4)  # no 3 MB block: 3 MB must go, the 1 and 2 MB blocks (not the 8)
        s = block_reuse_stats()
        assert s["cached_bytes"] == 8 * MB and s["live_bytes"] + s["cached_bytes"] <= s["peak_live_bytes"]
        del other
        other = torch.empty(5 * MB // 4)  # 5 MB must go: the 3 MB block is not enough, the 8 MB one alone is
        s = block_reuse_stats()
        assert s["cached_bytes"] == 3 * MB and s["live_bytes"] + s["cached_bytes"] <= s["peak_live_bytes"]
        del other
        more = torch.empty(12 * MB // 4)  # a new peak: nothing kept is large enough, all of it goes
        s = block_reuse_stats()
        assert s["cached_bytes"] <= s["peak_live_bytes"] - s["live_bytes"]
        del more


def test_reused_blocks_hold_stale_values_but_zeros_are_zeros():
    with reuse_cpu_blocks():
        x = torch.full((MB // 4,), 7.0)
        del x
        z = torch.zeros(MB // 4)
        assert block_reuse_stats()["hits"] > 0
        assert torch.count_nonzero(z).item() == 0


def test_scopes_nest_and_close_on_exceptions():
    with reuse_cpu_blocks():
        with reuse_cpu_blocks():
            assert block_reuse_stats()["depth"] == 2
        assert block_reuse_stats()["depth"] == 1 and block_reuse_stats()["active"]
    with pytest.raises(RuntimeError, match="inside"):
        with reuse_cpu_blocks():
            raise RuntimeError("inside")
    assert block_reuse_stats()["depth"] == 0 and not block_reuse_stats()["active"]


def test_switched_off_by_the_context_and_by_a_zero_limit():
    with no_block_reuse():
        with reuse_cpu_blocks():
            assert not block_reuse_stats()["active"] and block_reuse_stats()["depth"] == 0
    set_block_reuse_limit(0)
    with reuse_cpu_blocks():
        s = block_reuse_stats()
        assert not s["active"] and s["depth"] == 1
        x = torch.empty(MB)
        del x
        assert block_reuse_stats()["cached_bytes"] == 0
    assert block_reuse_stats()["depth"] == 0


@pytest.mark.parametrize("bad", [-1, True, "1", float("nan")])
def test_bad_limit_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="megabytes"):
        set_block_reuse_limit(bad)


def test_threads_allocating_inside_a_scope():
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for _ in range(50):
                a = torch.randn(20000, generator=g)
                b = a * 2
                assert torch.equal(b / 2, a)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    with reuse_cpu_blocks():
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert block_reuse_stats()["cached_bytes"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_engine_computes_bit_for_bit_what_it_computes_without_reuse(dtype):
    torch.manual_seed(0)
    net = Conv4(1, 8, 3, 28).to(dtype)
    xs, ys = torch.randn(2, 3, 1, 28, 28, dtype=dtype), torch.arange(3).repeat(2, 1)
    xq, yq = torch.randn(2, 6, 1, 28, 28, dtype=dtype), torch.arange(3).repeat_interleave(2).repeat(2, 1)

    def meta_grad():
        loss = maml_loss(net, F.cross_entropy, (xs, ys), (xq, yq), num_steps=2, lr=0.4)
        return torch.autograd.grad(loss, list(net.parameters()))

    hits = block_reuse_stats()["hits"]
    reused = meta_grad()
    assert block_reuse_stats()["hits"] > hits  # the engine did run inside a scope
    assert block_reuse_stats()["depth"] == 0 and block_reuse_stats()["cached_bytes"] == 0
    with no_block_reuse():
        fresh = meta_grad()
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)
