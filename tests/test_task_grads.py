"""Per-task gradients (endoarss_lib.weighting.task_grads) against independent references: one
``torch.autograd.grad`` per task on separately kept losses, written here. Both strategies ("loop", "batched") of
``task_gradients``, the gradient weightings' ``backward`` and GM-Coord's ``apply_to="shared"`` on tiny models (tiny
ViT + TESLA with and without SMA, tiny ResNet + TESLA / HPS, float32 and float64), the heads' gradients, the
diagnostics matrix, the stack-tracing that keeps a task's backward out of the other tasks' branches, and the batching
fallback. The SMA model uses the fused SMA, whose hand-written backward must also run batched."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from endoarss_lib.models import build_model
from endoarss_lib.training.diagnostics import task_gradient_matrix
from endoarss_lib.weighting import get_weighting
from endoarss_lib.weighting.task_grads import (batching_failure, get_default_mode, loss_roots, rows_matrix,
                                               set_default_mode, task_gradients)

GRAD_METHODS = ["DB-MTL", "Aligned-MTL", "MoCo"]
MODES = ["loop", "batched"]
TASKS = ("cls", "seg")


@pytest.fixture(autouse=True)
def _restore_mode():
    before = get_default_mode()
    yield
    set_default_mode(before)


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def tol(dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-6


# ---------------------------------------------------------------------------------------------------------------
# A small graph with two task branches and an unused / frozen parameter
# ---------------------------------------------------------------------------------------------------------------

def _problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {k: nn.Parameter(torch.randn(*s, generator=g, dtype=dtype)) for k, s in
         (("trunk", (4, 5)), ("head_a", (5, 3)), ("head_b", (5,)), ("unused", (2,)))}
    x = torch.randn(6, 4, generator=g, dtype=dtype)
    h = torch.tanh(x @ p["trunk"])
    la = torch.log_softmax(h @ p["head_a"], dim=1)[:, 0].mean().neg()
    lb = ((h * p["head_b"]).sum(1) ** 2).mean()
    return p, [la, lb]


def _reference(losses, params):
    """rows[j][t]: one autograd.grad per task, straight from the separate losses."""
    per_task = [torch.autograd.grad(l, params, retain_graph=True, allow_unused=True) for l in losses]
    return [[per_task[t][j] for t in range(len(losses))] for j in range(len(params))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["list", "stacked", "selects"])
def test_task_gradients_equal_per_task_autograd(dtype, mode, form):
    p, (la, lb) = _problem(dtype)
    params = list(p.values())
    ref = _reference([la, lb], params)
    losses = {"list": [la, lb], "stacked": torch.stack([la, lb]), "selects": list(torch.stack([la, lb]))}[form]
    rows = task_gradients(losses, params, mode=mode, retain_graph=True)
    assert len(rows) == len(params) and all(len(r) == 2 for r in rows)
    worst = 0.0
    for got, exp in zip(rows, ref):
        for g, e in zip(got, exp):
            if e is None:  # not reached: None (loop) or an exact zero row (batched)
                assert g is None or not g.any()
            else:
                worst = max(worst, max_diff(g, e))
    assert worst <= tol(dtype), worst
    # head_a is reached by task a only, head_b by task b only; 'unused' by none
    names = list(p)
    assert rows[names.index("unused")][0] is None or not rows[names.index("unused")][0].any()
    matrix = rows_matrix(rows, params)
    assert matrix.shape == (2, sum(x.numel() for x in params)) and matrix.dtype == dtype


def test_stacked_losses_are_traced_back_to_each_task():
    """Task a's backward never enters task b's branch (the old stack(L)[t] backward sent zeros through it)."""
    p, (la, lb) = _problem()
    visits = []
    lb_branch = lb * 1.0
    lb_branch.register_hook(lambda g: visits.append(g))
    losses = torch.stack([la, lb_branch])
    assert all(r is not None for r in loss_roots(losses))
    task_gradients(losses, [p["trunk"]], mode="loop", retain_graph=True)
    assert len(visits) == 1  # only task b's own backward reached its branch
    visits.clear()
    torch.autograd.grad(losses[0], [p["trunk"]], retain_graph=True)  # the old way
    assert len(visits) == 1 and visits[0].item() == 0.0


def test_constant_losses_give_zero_rows():
    p, (la, lb) = _problem()
    losses = torch.stack([la, torch.tensor(0.5, dtype=la.dtype)])
    for mode in MODES:
        g = rows_matrix(task_gradients(losses, [p["trunk"]], mode=mode, retain_graph=True), [p["trunk"]])
        ref = torch.autograd.grad(la, [p["trunk"]], retain_graph=True)[0].reshape(-1)
        assert max_diff(g[0], ref) <= 1e-12 and not g[1].any()
    assert loss_roots(torch.zeros(3)) == [None] * 3
    assert not rows_matrix(task_gradients([1.0, torch.tensor(2.0)], [p["trunk"]]), [p["trunk"]]).any()


class _NumpyScale(torch.autograd.Function):
    """x * 2 whose backward goes through NumPy: no batching rule, so a vmapped backward fails."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return torch.from_numpy(g.detach().numpy() * 2)


def test_batched_falls_back_to_the_loop_once_with_a_reason():
    p, (la, lb) = _problem()
    params = [p["trunk"], p["head_a"], p["head_b"]]

    def losses():
        h = torch.tanh(_NumpyScale.apply(torch.ones(3, 4, dtype=torch.float64) @ p["trunk"]))
        return [(h @ p["head_a"]).sum(), (h * p["head_b"]).pow(2).sum()]

    first = losses()
    ref = _reference(first, params)
    with pytest.warns(RuntimeWarning, match="falling back to one backward per task.*Reason"):
        rows = task_gradients(first, params, mode="batched")
    assert "RuntimeError" in batching_failure(params)
    for got, exp in zip(rows, ref):
        for g, e in zip(got, exp):
            assert (e is None and g is None) or max_diff(g, e) <= 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning, no second attempt
        rows2 = task_gradients(losses(), params, mode="batched")
    assert max_diff(rows_matrix(rows2, params), rows_matrix(rows, params)) == 0.0


def test_errors_of_the_graph_itself_are_raised_not_swallowed():
    p, (la, lb) = _problem(seed=3)
    params = [p["trunk"]]
    task_gradients([la, lb], params, mode="loop")  # frees the graph
    with pytest.raises(RuntimeError, match="second time|freed"):
        task_gradients([la, lb], params, mode="batched")
    assert batching_failure(params) is None
    with pytest.raises(ValueError, match="mode"):
        task_gradients([la, lb], params, mode="vmap")


# ---------------------------------------------------------------------------------------------------------------
# The weighting methods on tiny models: both strategies == the independent per-task reference
# ---------------------------------------------------------------------------------------------------------------

MODELS = {
    "vit_tesla": dict(backbone="vit_tiny_patch14", arch="tesla", image_size=28),
    "vit_sma_tesla": dict(backbone="vit_tiny_patch14", arch="tesla", image_size=28, sma=True, sma_dim=8),  # fused SMA
    "resnet_tesla": dict(backbone="resnet_tiny", arch="tesla", image_size=32),
    "resnet_hps": dict(backbone="resnet_tiny", arch="hps", image_size=32),
}


def _model(kind, dtype):
    torch.manual_seed(0)
    kw = MODELS[kind]
    model = build_model(num_activities=3, num_seg_classes=4, head_channels=8, **kw).to(dtype)
    model.train()  # BatchNorm on batch statistics, dropout (seeded per batch)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random (not zero-initialised) adapters so every parameter gets a gradient
        for n, prm in model.named_parameters():
            if prm.requires_grad and ("lora_B" in n or "tesla_B" in n or ".sma." in f".{n}"):
                prm.copy_(0.1 * torch.randn(prm.shape, generator=g, dtype=dtype))
    s = kw["image_size"]
    batches = [{"image": torch.randn(2, 3, s, s, generator=g, dtype=dtype), "label": torch.tensor([0, 2]),
                "mask": torch.randint(0, 4, (2, s, s), generator=g), "seed": i} for i in range(2)]
    return model, batches


def _losses(model, batch):
    """Cross-entropies in the model's dtype (the library's task_losses computes them in float32); the same dropout
    masks in every forward of a batch."""
    torch.manual_seed(batch["seed"])
    out = model(batch["image"])
    return torch.stack([F.cross_entropy(out["cls"], batch["label"]), F.cross_entropy(out["seg"], batch["mask"])])


def _reference_step(model, batch, method, shared, heads):
    """Per-task gradients from separately computed losses (one forward per task), the method on them, and the
    heads' objective's gradient: independent of task_grads."""
    G = []
    for t in range(2):
        loss_t = _losses(model, batch)[t]
        G.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in
                            zip(shared, torch.autograd.grad(loss_t, shared, allow_unused=True))]))
    L = _losses(model, batch)
    if method.name == "GM-Coord":
        k = method._advance(L.detach())
        d, w = k.to(G[0].dtype) @ torch.stack(G), k
        head_obj = L.sum()
    else:
        d, w = method.combine(torch.stack(G), L.detach())
        head_obj = method.combine_losses(L)
    head_grads = torch.autograd.grad(head_obj, heads, allow_unused=True)
    return d, w, head_grads


def _run(method, model, batches, params, shared, heads_per_task):
    """Accumulated .grad of ``params`` after one ``backward`` per batch (fresh gradients), and the task weights."""
    model.zero_grad(set_to_none=True)
    weights = []
    for batch in batches:
        if method.name == "GM-Coord":
            method.set_progress([0.9, 0.3])
        weights.append(method.backward(_losses(model, batch), shared, heads_per_task))
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params], weights


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighting_backward_both_modes_equal_the_per_task_reference(kind, dtype):
    model, batches = _model(kind, dtype)
    shared = model.trainable_shared_parameters()
    heads_per_task = [model.task_specific_parameters(t) for t in TASKS]
    heads = [p for h in heads_per_task for p in h]
    params = shared + heads
    assert shared and heads
    for name in GRAD_METHODS + ["GM-Coord"]:
        hp = {"apply_to": "shared", "alpha": 1.0} if name == "GM-Coord" else {}
        ref_method = get_weighting(name, **hp)
        expected, ref_weights = [torch.zeros_like(p) for p in params], []
        for batch in batches:  # two steps: stateful methods and gradient accumulation
            if name == "GM-Coord":
                ref_method.set_progress([0.9, 0.3])
            d, w, head_grads = _reference_step(model, batch, ref_method, shared, heads)
            ref_weights.append(w)
            off = 0
            for i, p in enumerate(shared):
                expected[i] += d[off:off + p.numel()].view(p.shape).to(dtype)
                off += p.numel()
            for i, g in enumerate(head_grads):
                if g is not None:
                    expected[len(shared) + i] += g
        scale = max(1.0, max(float(e.abs().max()) for e in expected))
        for mode in MODES:
            set_default_mode(mode)
            got, weights = _run(get_weighting(name, **hp), model, batches, params, shared, heads_per_task)
            diff_shared = max(max_diff(g, e) for g, e in zip(got[:len(shared)], expected[:len(shared)]))
            diff_heads = max(max_diff(g, e) for g, e in zip(got[len(shared):], expected[len(shared):]))
            assert diff_shared <= tol(dtype) * scale, (name, mode, diff_shared)
            assert diff_heads <= tol(dtype) * scale, (name, mode, diff_heads)
            for w, w_ref in zip(weights, ref_weights):
                assert max_diff(w, w_ref) <= tol(dtype) * max(1.0, float(w_ref.abs().max())), (name, mode)
        assert batching_failure(params) is None  # these models batch without falling back


@pytest.mark.parametrize("mode", MODES)
def test_diagnostics_matrix_equals_the_per_task_reference(mode):
    model, batches = _model("vit_tesla", torch.float64)
    named = list(model.named_trainable_shared_parameters())
    params = [p for _, p in named]
    L = _losses(model, batches[0])
    grads, slices = task_gradient_matrix(L, named, mode=mode)
    ref = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(_losses(model, batches[0])[t], params)])
                       for t in range(2)])
    assert grads.dtype == torch.float32 and max_diff(grads, ref.float()) <= 1e-6
    assert list(slices) == ["block00", "block01", "block02"]
    L.sum().backward()  # the graph was kept for the training step
