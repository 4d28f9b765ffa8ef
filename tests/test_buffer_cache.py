"""The cache of large CPU gradient buffers behind the heads' backward passes.

Specification: a buffer is an ordinary tensor of the asked shape and dtype; its memory is handed
out again only after it died, never while it is alive; the cache respects its limit and can be
cleared; and the heads' gradients are the same whether their buffers are fresh or reused.
"""
import pytest
import torch

import fastmaml
from fastmaml.heads import ridge_predict, svm_logits
from fastmaml.ops.buffers import (bmm_into_gradient_buffer, buffer_cache_stats, clear_buffer_cache, gradient_buffer,
                                  no_buffer_cache, set_buffer_cache_limit)

native = pytest.mark.skipif(not fastmaml.HAS_NATIVE, reason="compiled module not built")
BIG = (4, 75, 512)  # 600 KB in float32: above the cache's 64 KB granule


@pytest.fixture
def fresh_cache():
    clear_buffer_cache()
    yield
    set_buffer_cache_limit(2048)
    clear_buffer_cache()


def test_buffer_is_an_ordinary_tensor():
    like = torch.randn(3, dtype=torch.float64)
    buf = gradient_buffer(like, BIG)
    assert buf.shape == BIG and buf.dtype == torch.float64 and buf.is_contiguous()
    buf.copy_(torch.arange(buf.numel(), dtype=torch.float64).reshape(BIG))
    assert buf[1, 2, 3].item() == float((1 * 75 + 2) * 512 + 3)


@native
def test_memory_is_reused_only_after_the_buffer_died(fresh_cache):
    like = torch.randn(1)
    a = gradient_buffer(like, BIG)
    b = gradient_buffer(like, BIG)
    assert a.data_ptr() != b.data_ptr()  # both alive: distinct memory
    ptr = a.data_ptr()
    del a
    assert buffer_cache_stats()["cached_blocks"] == 1
    c = gradient_buffer(like, BIG)
    assert c.data_ptr() == ptr and buffer_cache_stats()["cached_blocks"] == 0
    view = c[0]  # a view keeps the block alive
    del c
    assert buffer_cache_stats()["cached_blocks"] == 0
    del view
    assert buffer_cache_stats()["cached_blocks"] == 1


@native
def test_limit_and_clear(fresh_cache):
    like = torch.randn(1)
    set_buffer_cache_limit(0)
    del_me = gradient_buffer(like, BIG)
    del del_me
    assert buffer_cache_stats()["cached_bytes"] == 0  # off: back to the OS
    set_buffer_cache_limit(64)
    kept = gradient_buffer(like, BIG)
    del kept
    assert buffer_cache_stats()["cached_bytes"] > 0
    assert clear_buffer_cache() > 0 and buffer_cache_stats()["cached_bytes"] == 0
    with pytest.raises(ValueError, match="megabytes must be a number >= 0"):
        set_buffer_cache_limit(-1)


@native
def test_no_buffer_cache_bypasses_without_dropping_the_blocks(fresh_cache):
    like = torch.randn(1)
    kept = gradient_buffer(like, BIG)
    ptr = kept.data_ptr()
    del kept
    with no_buffer_cache():
        fresh = gradient_buffer(like, BIG)
        assert fresh.data_ptr() != ptr
        del fresh
    assert buffer_cache_stats()["cached_blocks"] == 1  # the fresh buffer went back to the OS
    assert gradient_buffer(like, BIG).data_ptr() == ptr


def test_bmm_into_buffer_matches_bmm_and_keeps_graphs():
    a, b = torch.randn(4, 75, 5, dtype=torch.float64), torch.randn(4, 5, 512, dtype=torch.float64)
    torch.testing.assert_close(bmm_into_gradient_buffer(a, b), a @ b)
    leaf = a.clone().requires_grad_()
    assert bmm_into_gradient_buffer(leaf, b).requires_grad


@native
@pytest.mark.parametrize("head", ["ridge", "svm"])
def test_head_gradients_are_the_same_with_reused_buffers(fresh_cache, head):
    # sizes above the cache's granule, two calls: the second backward writes into the blocks the
    # first one's gradients left behind
    g = torch.Generator().manual_seed(0)
    T, n_way, shot, q, d = 4, 5, 2, 75, 512
    labels = torch.arange(n_way).repeat_interleave(shot).expand(T, -1).contiguous()
    X = torch.randn(T, n_way * shot, d, generator=g, dtype=torch.float64)
    Xq = torch.randn(T, q, d, generator=g, dtype=torch.float64)
    w = torch.randn(T, q, n_way, generator=g, dtype=torch.float64)

    def grads():
        Xg, Xqg = X.clone().requires_grad_(), Xq.clone().requires_grad_()
        if head == "ridge":
            out = ridge_predict(Xg, torch.nn.functional.one_hot(labels, n_way).double(), Xqg, 0.5)
        else:
            out = svm_logits(Xg, labels, Xqg, n_way)[0]
        return torch.autograd.grad((out * w).sum(), (Xg, Xqg))

    set_buffer_cache_limit(0)
    fresh = grads()
    set_buffer_cache_limit(2048)
    first = grads()
    for f, a in zip(fresh, first):
        torch.testing.assert_close(a, f, rtol=0, atol=0)
    del first  # its blocks go back to the cache, poisoned here ...
    poison = [gradient_buffer(X, t.shape).fill_(float("nan")) for t in (X, Xq)]
    del poison
    hits = buffer_cache_stats()["hits"]
    second = grads()  # ... and the next backward writes into them
    assert buffer_cache_stats()["hits"] > hits
    for f, b in zip(fresh, second):
        torch.testing.assert_close(b, f, rtol=0, atol=0)


def test_fake_tensors_get_fake_buffers():
    # while torch.compile traces, the backward's buffers must be traceable, not cached real memory
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        a, b = torch.randn(4, 75, 5), torch.randn(4, 5, 512)
        out = bmm_into_gradient_buffer(a, b)
    assert isinstance(out, FakeTensor) and out.shape == (4, 75, 512)
