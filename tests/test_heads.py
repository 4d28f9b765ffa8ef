"""Few-shot heads under one interface: shapes, agreement with the references, gradients, bad input."""
import pytest
import torch

from fastmaml.heads.classifiers import MetaOptNetRidgeHead, ProtoNetHead, R2D2Head, SVMHead
from fastmaml.heads.qp import qp_solve
from fastmaml.reference.heads import (
    crammer_singer_qp_reference,
    protonet_logits_reference,
    r2d2_logits_reference,
    ridge_predict_reference,
)

F64 = torch.float64
HEADS = {
    "r2d2": lambda: R2D2Head(lam_init=0.5, scale_init=0.7, bias_init=0.1),
    "metaoptnet_ridge": lambda: MetaOptNetRidgeHead(scale_init=2.0),
    "protonet": lambda: ProtoNetHead(scale_init=1.5),
    "svm": lambda: SVMHead(scale_init=3.0),
}
# Agreement with the float64 reference relative to the largest logit, per dtype.
RTOL = {F64: 1e-8, torch.float32: 1e-4}


def episode(T, n_way, shot, q, d, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n_way * shot, d, generator=g, dtype=F64)
    Xq = torch.randn(T, q, d, generator=g, dtype=F64)
    labels = torch.arange(n_way).repeat_interleave(shot).repeat(T, 1)
    return X.to(dtype), labels, Xq.to(dtype)


def reference_logits(name, head, X, labels, Xq, n_way):
    X, Xq = X.double(), Xq.double()
    if name == "r2d2":
        return r2d2_logits_reference(X, labels, Xq, n_way, head.lam.double(), head.scale.double(), head.bias.double())
    if name == "metaoptnet_ridge":
        Y = torch.nn.functional.one_hot(labels, n_way).double()
        return head.scale.double() * ridge_predict_reference(X, Y, Xq, 50.0)
    if name == "protonet":
        return protonet_logits_reference(X, labels, Xq, n_way, head.scale.double())
    T, n = labels.shape
    alpha = qp_solve(*crammer_singer_qp_reference(X @ X.mT, labels, n_way, 0.1)).z.reshape(T, n, n_way)
    return head.scale.double() * torch.einsum("tik,tid,tjd->tjk", alpha, X, Xq)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("T,n_way,shot,q,d", [(1, 5, 1, 7, 59), (3, 5, 2, 4, 97), (17, 3, 2, 2, 5)])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_match_references(name, T, n_way, shot, q, d, dtype):
    head = HEADS[name]()
    X, labels, Xq = episode(T, n_way, shot, q, d, seed=T, dtype=dtype)
    logits = head(X, labels, Xq, n_way)
    assert logits.shape == (T, q, n_way) and logits.dtype == dtype
    ref = reference_logits(name, head, X, labels, Xq, n_way).detach()
    err = float((logits.detach().double() - ref).abs().max() / ref.abs().max())
    assert err < RTOL[dtype], err


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_are_differentiable_and_learn_their_parameters(name):
    head = HEADS[name]()
    X, labels, Xq = episode(2, 3, 2, 4, 16)
    X.requires_grad_()
    Xq.requires_grad_()
    loss = torch.nn.functional.cross_entropy(head(X, labels, Xq, 3).reshape(-1, 3), torch.arange(3).repeat(3)[:8])
    loss.backward()
    assert X.grad is not None and Xq.grad is not None and torch.isfinite(X.grad).all()
    for pname, par in head.named_parameters():
        assert par.grad is not None and torch.isfinite(par.grad).all(), pname
    if name == "svm":
        assert head.last_result.converged.all()


@pytest.mark.parametrize("name", ["r2d2", "metaoptnet_ridge", "protonet"])
def test_second_order_heads_pass_gradgradcheck(name):
    head = HEADS[name]().double()
    X, labels, Xq = episode(1, 3, 1, 2, 5)
    X.requires_grad_()
    Xq.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: head(a, labels, b, 3), (X, Xq))


def test_r2d2_head_gradient_wrt_lambda_scale_bias_matches_reference():
    head = R2D2Head(lam_init=0.8).double()
    X, labels, Xq = episode(2, 4, 2, 3, 20)
    out = head(X, labels, Xq, 4).square().sum()
    grads = torch.autograd.grad(out, [head.log_lam, head.scale, head.bias])
    ref = r2d2_logits_reference(X, labels, Xq, 4, head.log_lam.exp(), head.scale, head.bias).square().sum()
    ref_grads = torch.autograd.grad(ref, [head.log_lam, head.scale, head.bias])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise():
    X, labels, Xq = episode(2, 3, 2, 4, 16)
    head = R2D2Head()
    with pytest.raises(TypeError, match="support_labels must have dtype torch.int64"):
        head(X, labels.int(), Xq, 3)
    with pytest.raises(ValueError, match=r"support_labels must lie in \[0, n_way\)"):
        head(X, labels, Xq, 2)
    with pytest.raises(ValueError, match=r"query_features must have shape \[2, q, 16\]"):
        head(X, labels, Xq[..., :15], 3)
    with pytest.raises(ValueError, match=r"support_features must have shape \[T, n, d\]"):
        head(X[0], labels, Xq, 3)
    with pytest.raises(TypeError, match="n_way must be an int"):
        head(X, labels, Xq, 3.0)
    Xn = X.clone()
    Xn[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="support_features must be finite"):
        head(Xn, labels, Xq, 3)
    with pytest.raises(ValueError, match="class 3 has no support example in task 0"):
        ProtoNetHead()(X, labels, Xq, 4)
    with pytest.raises(ValueError, match="lam_init must be finite and > 0"):
        R2D2Head(lam_init=-1.0)


def test_values_verified_skips_only_the_named_tensors_and_only_inside():
    # a head module checks the features' values once; the functional op it calls does not re-read them
    from fastmaml.heads._common import check_batched, values_verified

    bad = torch.randn(2, 3, 4)
    bad[1, 2, 3] = float("inf")
    other = bad.clone()
    with values_verified(bad):
        check_batched(bad, "x", 3, "[T, n, d]")  # skipped: verified by the caller
        with pytest.raises(ValueError, match="y must be finite"):
            check_batched(other, "y", 3, "[T, n, d]")  # an equal but different tensor is checked
        with pytest.raises(ValueError, match=r"x must have shape \[T, n, d\] \(rank 3\)"):
            check_batched(bad[0], "x", 3, "[T, n, d]")  # shapes are always checked
    with pytest.raises(ValueError, match="x must be finite"):
        check_batched(bad, "x", 3, "[T, n, d]")
