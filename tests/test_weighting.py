"""Tests of endoarss_lib.weighting against hand-computed cases and independent NumPy implementations written here
straight from the formulas of docs/training.md (never calling the module), plus the methods' invariants, the
training-time ``backward`` entry point on a tiny model with a frozen shared parameter, and bitwise state_dict
resume."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from endoarss_lib.weighting import (STCH, AlignedMTL, DBMTL, EW, MoCo, WEIGHTINGS, aligned_mtl, alignment_matrix,
                                    db_mtl, get_weighting, moco)

ALL = ["EW", "DB-MTL", "Aligned-MTL", "MoCo", "STCH"]
GRAD_METHODS = ["DB-MTL", "Aligned-MTL", "MoCo"]


def t64(x):
    return torch.tensor(np.asarray(x, dtype=np.float64))


# ---------------------------------------------------------------------------------------------------------------
# Independent NumPy references (from the formulas in docs/training.md)
# ---------------------------------------------------------------------------------------------------------------

class NpDBMTL:
    def __init__(self, beta=0.9, beta_sigma=0.0):
        self.beta, self.beta_sigma, self.m, self.step = beta, beta_sigma, None, 0

    def __call__(self, G, L):
        self.step += 1
        g = G / (L[:, None] + 1e-8)
        if self.m is None:
            self.m = np.zeros_like(g)
        b = self.beta / self.step ** self.beta_sigma
        self.m = b * self.m + (1 - b) * g
        norms = np.sqrt((self.m ** 2).sum(1))
        alpha = norms.max() / (norms + 1e-8)
        return (alpha[:, None] * self.m).sum(0), alpha


def np_aligned(G, eps=np.finfo(np.float64).eps):
    M = G @ G.T
    lam, V = np.linalg.eigh(M)
    keep = lam > lam.max() * G.shape[0] * eps
    lam, V = lam[keep], V[:, keep]
    B = np.sqrt(lam.min()) * V @ np.diag(lam ** -0.5) @ V.T
    alpha = B.sum(0)
    return alpha @ G, alpha, B


class NpMoCo:
    def __init__(self, T, P, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
        self.y, self.lam = np.zeros((T, P)), np.full(T, 1.0 / T)
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma, self.rho = beta, beta_sigma, gamma, gamma_sigma, rho
        self.step = 0

    def __call__(self, G, L):
        self.step += 1
        T = G.shape[0]
        g = np.stack([G[t] / (np.linalg.norm(G[t]) + 1e-8) * L[t] for t in range(T)])
        self.y = self.y - self.beta / self.step ** self.beta_sigma * (self.y - g)
        a = self.lam - self.gamma / self.step ** self.gamma_sigma * (self.y @ self.y.T + self.rho * np.eye(T)) @ self.lam
        e = np.exp(a - a.max())
        self.lam = e / e.sum()
        return self.y.T @ self.lam, self.lam


def np_stch_loss_and_grad(L, z, mu):
    """Un-shifted smooth Tchebycheff mu * lse(l / mu) * T and its gradient w.r.t. L."""
    T = len(L)
    l = np.log(L / z + 1e-20)
    a = l / mu
    lse = a.max() + np.log(np.exp(a - a.max()).sum())
    soft = np.exp(a - lse)
    dl_dL = (1 / z) / (L / z + 1e-20)
    return mu * lse * T, T * soft * dl_dL


# ---------------------------------------------------------------------------------------------------------------
# Registry and validation
# ---------------------------------------------------------------------------------------------------------------

def test_registry_names_and_aliases():
    assert list(WEIGHTINGS) == ALL
    for alias, cls in [("ew", EW), ("db_mtl", DBMTL), ("DBMTL", DBMTL), ("aligned_mtl", AlignedMTL),
                       ("Aligned-MTL", AlignedMTL), ("moco", MoCo), ("stch", STCH)]:
        assert type(get_weighting(alias)) is cls
    assert [get_weighting(n).needs_task_grads for n in ALL] == [False, True, True, True, False]
    with pytest.raises(ValueError) as e:
        get_weighting("PCGrad")
    for n in ALL:
        assert n in str(e.value)


def test_defaults_from_training_md():
    assert get_weighting("DB-MTL").hparams == {"beta": 0.9, "beta_sigma": 0.0}
    assert get_weighting("MoCo").hparams == {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5,
                                             "rho": 0.0}
    assert get_weighting("STCH").hparams == {"mu": 1.0, "warmup_epochs": 4, "warmup_convention": "spec"}
    assert get_weighting("Aligned-MTL").hparams == {"eps": None}


@pytest.mark.parametrize("name,bad", [("EW", "beta"), ("DB-MTL", "gamma"), ("MoCo", "mu"), ("STCH", "beta"),
                                      ("Aligned-MTL", "warmup")])
def test_unknown_hparam_is_type_error_naming_it(name, bad):
    with pytest.raises(TypeError, match=bad):
        get_weighting(name, **{bad: 0.5})


@pytest.mark.parametrize("name,param,value", [
    ("DB-MTL", "beta", 1.0), ("DB-MTL", "beta", -0.1), ("DB-MTL", "beta", float("nan")),
    ("DB-MTL", "beta_sigma", -1.0), ("MoCo", "beta", 0.0), ("MoCo", "beta", 1.5), ("MoCo", "gamma", -0.1),
    ("MoCo", "rho", -1.0), ("MoCo", "gamma_sigma", -0.5), ("STCH", "mu", 0.0), ("STCH", "mu", -1.0),
    ("STCH", "warmup_epochs", 0), ("Aligned-MTL", "eps", 0.0)])
def test_invalid_values_are_value_errors_naming_the_parameter(name, param, value):
    with pytest.raises(ValueError, match=param):
        get_weighting(name, **{param: value})


@pytest.mark.parametrize("name", ALL)
def test_shapes_validated(name):
    w = get_weighting(name)
    with pytest.raises(ValueError, match="2-D"):
        w.combine(torch.ones(4), torch.ones(2))
    with pytest.raises(ValueError, match="2-D"):
        w.combine(torch.ones(2, 3, 4), torch.ones(2))
    with pytest.raises(ValueError, match="length"):
        w.combine(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="1-D"):
        w.combine(torch.ones(2, 3), torch.ones(2, 1))
    w.combine(torch.ones(2, 3), torch.ones(2))  # and a valid call still works


# ---------------------------------------------------------------------------------------------------------------
# EW
# ---------------------------------------------------------------------------------------------------------------

def test_ew_is_plain_sum():
    G, L = torch.randn(3, 5, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1
    d, w = EW().combine(G, L)
    assert torch.equal(w, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(d, G.sum(0))
    assert EW().combine_losses(L) == L.sum()
    x = torch.randn(4, requires_grad=True)
    w = EW().backward([(x ** 2).sum(), (3 * x).sum()], [x])
    assert torch.allclose(x.grad, 2 * x.detach() + 3) and torch.equal(w, torch.ones(2))


# ---------------------------------------------------------------------------------------------------------------
# DB-MTL
# ---------------------------------------------------------------------------------------------------------------

def test_db_mtl_hand_orthogonal_first_step():
    # log-grads (3,0)/1 and (0,4)/2 = (0,2); zero-initialised buffer: m = 0.1 g -> norms 0.3, 0.2
    d, alpha = DBMTL().combine(t64([[3, 0], [0, 4]]), t64([1, 2]))
    assert np.allclose(alpha, [0.3 / (0.3 + 1e-8), 0.3 / (0.2 + 1e-8)], rtol=1e-12)
    assert np.allclose(d, [0.3, 0.3], rtol=1e-7)


def test_db_mtl_identical_and_zero_gradients():
    g = np.array([1.0, -2.0, 2.0])
    d, alpha = DBMTL().combine(t64([g, g]), t64([1, 1]))      # identical: alpha = 1, d = 2 * 0.1 g
    assert np.allclose(alpha, 1) and np.allclose(d, 0.2 * g / (1 + 1e-8))
    d, alpha = DBMTL().combine(t64([g, np.zeros(3)]), t64([1, 1]))  # zero gradient: huge finite alpha, no NaN
    assert torch.isfinite(alpha).all() and torch.isfinite(d).all()
    assert np.allclose(d, 0.1 * g / (1 + 1e-8))


@pytest.mark.parametrize("T,beta,beta_sigma", [(2, 0.9, 0.0), (3, 0.9, 0.5), (3, 0.0, 0.0)])
def test_db_mtl_matches_numpy_over_steps(T, beta, beta_sigma):
    rng = np.random.default_rng(T)
    ref, w = NpDBMTL(beta, beta_sigma), DBMTL(beta=beta, beta_sigma=beta_sigma)
    for _ in range(6):
        G, L = rng.normal(size=(T, 7)) * rng.uniform(0.01, 10, size=(T, 1)), rng.uniform(0.05, 3, size=T)
        d, alpha = w.combine(t64(G), t64(L))
        d_ref, alpha_ref = ref(G, L)
        assert np.allclose(d, d_ref, rtol=1e-10) and np.allclose(alpha, alpha_ref, rtol=1e-10)
        # invariant: every task rescaled to the largest EMA norm
        scaled = np.linalg.norm(alpha.numpy()[:, None] * w.buffer.numpy(), axis=1)
        assert np.allclose(scaled, scaled.max(), rtol=1e-6)
    # the pure function is the same step
    G, L = rng.normal(size=(T, 7)), rng.uniform(0.5, 2, size=T)
    buf = w.buffer.clone()
    d1, a1, nb = db_mtl(t64(G), t64(L), buf, w.step + 1, beta, beta_sigma)
    d2, a2 = w.combine(t64(G), t64(L))
    assert torch.equal(d1, d2) and torch.equal(a1, a2) and torch.equal(nb, w.buffer)


# ---------------------------------------------------------------------------------------------------------------
# Aligned-MTL
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aligned_mtl_hand_cases(dtype):
    tt = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    # orthogonal: M = diag(9, 16), lambda_min = 9, B = 3 diag(1/3, 1/4) -> alpha (1, 0.75), d (3, 3)
    d, a = AlignedMTL().combine(tt([[3., 0.], [0., 4.]]), tt([1., 1.]))
    assert torch.allclose(a, tt([1., 0.75])) and torch.allclose(d, tt([3., 3.]))
    # identical: eigenvalues 2|g|^2 and 0 (dropped) -> B = [[.5,.5],[.5,.5]], alpha (1, 1), d = 2 g
    g = [1., 2., -2.]
    d, a = AlignedMTL().combine(tt([g, g]), tt([1., 1.]))
    assert torch.allclose(a, tt([1., 1.]), atol=1e-6) and torch.allclose(d, 2 * tt(g), atol=1e-5)
    # one zero gradient: its eigenvalue 0 is dropped, alpha (1, 0), d = g1
    d, a = AlignedMTL().combine(tt([[3., 0.], [0., 0.]]), tt([1., 1.]))
    assert torch.allclose(a, tt([1., 0.])) and torch.allclose(d, tt([3., 0.]))
    # T = 3 orthogonal with norms 1, 2, 4: lambda_min = 1 -> alpha = (1, 1/2, 1/4), d = (1, 1, 1)
    d, a = AlignedMTL().combine(tt([[1., 0, 0], [0, 2., 0], [0, 0, 4.]]), tt([1., 1., 1.]))
    assert torch.allclose(a, tt([1., .5, .25])) and torch.allclose(d, tt([1., 1., 1.]))
    # all zero: zero gradient and zero weights, no NaN
    d, a = AlignedMTL().combine(torch.zeros(2, 3, dtype=dtype), tt([1., 1.]))
    assert torch.equal(d, torch.zeros(3, dtype=dtype)) and torch.equal(a, torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("T", [2, 3])
def test_aligned_mtl_matches_numpy_and_invariants(T):
    rng = np.random.default_rng(10 + T)
    G = rng.normal(size=(T, 9)) * np.array([0.1, 1, 10][:T])[:, None]
    d, a = aligned_mtl(t64(G), t64(np.ones(T)))
    d_ref, a_ref, B_ref = np_aligned(G)
    assert np.allclose(d, d_ref, rtol=1e-9) and np.allclose(a, a_ref, rtol=1e-9)
    # aligned matrix B G: orthogonal rows of equal norm sqrt(lambda_min)
    B = alignment_matrix(t64(G)).numpy()
    lam_min = np.linalg.eigvalsh(G @ G.T).min()
    BG = B @ G
    assert np.allclose(BG @ BG.T, lam_min * np.eye(T), atol=1e-9 * lam_min + 1e-12)
    # equal projections: d's coordinates on the orthonormal independent components U = M^-1/2 G are all sqrt(lam_min)
    lam, V = np.linalg.eigh(G @ G.T)
    U = V @ np.diag(lam ** -0.5) @ V.T @ G
    assert np.allclose(U @ U.T, np.eye(T), atol=1e-9)
    assert np.allclose(U @ d.numpy(), np.sqrt(lam_min), rtol=1e-8)
    # and the aligned rows project equally on d: <(B G)_t, d> = lambda_min
    assert np.allclose(BG @ d.numpy(), lam_min, rtol=1e-8)


def test_aligned_mtl_orthogonal_equal_projections_and_rank_deficient():
    G = np.array([[2., 0, 0], [0, 5., 0]])
    d, _ = aligned_mtl(t64(G))
    cos_proj = (G / np.linalg.norm(G, axis=1, keepdims=True)) @ d.numpy()
    assert np.allclose(cos_proj, cos_proj[0]) and np.allclose(cos_proj, 2.0)
    # rank 2 with T = 3 (g3 = g1 + g2): the null eigenvalue is dropped, matches the reference
    rng = np.random.default_rng(0)
    g1, g2 = rng.normal(size=5), rng.normal(size=5)
    G3 = np.stack([g1, g2, g1 + g2])
    d, a = aligned_mtl(t64(G3))
    d_ref, a_ref, _ = np_aligned(G3, eps=1e-10)
    assert np.allclose(d, d_ref, rtol=1e-6) and np.allclose(a, a_ref, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# MoCo
# ---------------------------------------------------------------------------------------------------------------

def test_moco_hand_first_step():
    # normalised rows (1, 0) * 1 and (0, 1) * 2; y = 0.5 Gn = diag(.5, 1); y y^T lambda0 = (.125, .5)
    # lambda = softmax((.5, .5) - .1 (.125, .5)) = softmax(.4875, .45); d = y^T lambda
    d, lam = MoCo().combine(t64([[3, 0], [0, 4]]), t64([1, 2]))
    l0 = 1 / (1 + math.exp(0.45 - 0.4875))
    assert np.allclose(lam, [l0, 1 - l0], rtol=1e-7)
    assert np.allclose(d, [0.5 * 3 / (3 + 1e-8) * l0, 2 * 4 / (4 + 1e-8) * 0.5 * (1 - l0)], rtol=1e-9)


@pytest.mark.parametrize("T,kw", [(2, {}), (3, {}), (3, {"rho": 0.3, "beta": 0.9, "gamma": 0.5})])
def test_moco_matches_numpy_and_simplex(T, kw):
    rng = np.random.default_rng(20 + T)
    ref, w = NpMoCo(T, 6, **kw), MoCo(**kw)
    for step in range(60):
        G, L = rng.normal(size=(T, 6)) * rng.uniform(0.1, 5, size=(T, 1)), rng.uniform(0.1, 3, size=T)
        if step == 5:
            G[0] = 0.0  # a zero gradient: stays zero, no NaN
        d, lam = w.combine(t64(G), t64(L))
        d_ref, lam_ref = ref(G, L)
        assert np.allclose(d, d_ref, rtol=1e-9, atol=1e-12) and np.allclose(lam, lam_ref, rtol=1e-9)
        assert (lam >= 0).all() and abs(float(lam.sum()) - 1) < 1e-12


def test_moco_identical_gradients_symmetric():
    g = [1.0, 2.0, -1.0]
    d, lam = MoCo().combine(t64([g, g, g]), t64([1, 1, 1]))
    assert np.allclose(lam, 1 / 3)
    assert np.allclose(d, 0.5 * np.array(g) / np.linalg.norm(g))
    # pure function == first step of a fresh instance
    d2, lam2, y = moco(t64([g, g, g]), t64([1, 1, 1]))
    assert torch.equal(d, d2) and torch.equal(lam, lam2) and y.shape == (3, 3)


# ---------------------------------------------------------------------------------------------------------------
# STCH
# ---------------------------------------------------------------------------------------------------------------

def test_stch_warmup_nadir_and_switch():
    w = STCH(mu=0.5, warmup_epochs=2)
    seen = {0: [], 1: []}
    rng = np.random.default_rng(3)
    for epoch in range(2):
        w.set_epoch(epoch, 5)
        for _ in range(3):
            L = rng.uniform(0.2, 2.0, size=3)
            seen[epoch].append(L)
            loss = w.combine_losses(t64(L))
            assert np.isclose(float(loss), np.log(L + 1e-20).sum())
        assert w.nadir is None
    w.set_epoch(2, 5)  # switch at epoch == warmup_epochs
    L = np.array([0.5, 1.0, 1.5])
    Lt = t64(L).requires_grad_(True)
    loss = w.combine_losses(Lt)
    z = np.mean(seen[1], axis=0)  # nadir = mean of the LAST warm-up epoch's losses only
    assert np.allclose(w.nadir, z, rtol=1e-12)
    # value: shifted by the detached max: mu * lse((l - max l) / mu) * T
    l = np.log(L / z + 1e-20)
    a = (l - l.max()) / 0.5
    assert np.isclose(loss.item(), 0.5 * (np.log(np.exp(a).sum())) * 3)
    # gradient equals the un-shifted smooth Tchebycheff's
    (grad,) = torch.autograd.grad(loss, Lt)
    _, grad_ref = np_stch_loss_and_grad(L, z, 0.5)
    assert np.allclose(grad, grad_ref, rtol=1e-10)
    # returned task weights = d loss / d L; combine is its chain rule
    G = rng.normal(size=(3, 4))
    d, wts = w.combine(t64(G), t64(L))
    assert np.allclose(wts, grad_ref, rtol=1e-10) and np.allclose(d, grad_ref @ G, rtol=1e-10)


def test_stch_warmup_weights_and_two_tasks():
    w = STCH(warmup_epochs=1)
    d, wts = w.combine(t64([[1, 0], [0, 1]]), t64([0.5, 4.0]))
    assert np.allclose(wts, [2.0, 0.25]) and np.allclose(d, [2.0, 0.25])
    w.set_epoch(1)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    y = x * t64([0.25, 8.0])  # L = (0.25, 16): nadir (0.5, 4) -> L/z = (0.5, 4)
    wts = w.backward(y)
    _, g_ref = np_stch_loss_and_grad(np.array([0.25, 16.0]), np.array([0.5, 4.0]), 1.0)
    assert np.allclose(wts, g_ref) and np.allclose(x.grad, g_ref * np.array([0.25, 8.0]))


def test_stch_missing_nadir_raises():
    w = STCH(warmup_epochs=3)
    w.set_epoch(0)
    w.combine_losses(torch.ones(2))
    w.set_epoch(3)  # jumped over epoch 2, the nadir epoch
    with pytest.raises(RuntimeError, match="nadir"):
        w.combine_losses(torch.ones(2))


# ---------------------------------------------------------------------------------------------------------------
# backward(): the training-time entry point on a tiny model
# ---------------------------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.trunk = nn.Linear(4, 5)
        self.frozen = nn.Parameter(torch.randn(5, generator=g), requires_grad=False)  # frozen shared parameter
        self.head_a = nn.Linear(5, 3)
        self.head_b = nn.Linear(5, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def shared(self):
        return [self.trunk.weight, self.trunk.bias, self.frozen]

    def losses(self, x):
        h = torch.tanh(self.trunk(x) * self.frozen)
        la = nn.functional.cross_entropy(self.head_a(h), torch.tensor([0, 1, 2, 1]))
        lb = (self.head_b(h) ** 2).mean()
        return torch.stack([la, lb])


def _reference_step(model, x, method):
    """Independent per-task gradients, the method's combine on a fresh copy, and head gradients h_t dL_t."""
    L = model.losses(x)
    trainable = [p for p in model.shared() if p.requires_grad]
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(L[t], trainable, retain_graph=True)])
                     for t in range(2)])
    d, w = method.combine(G, L.detach())
    h = torch.ones(2) if method.name != "DB-MTL" else 1 / (L.detach() + 1e-8)
    head_a = torch.autograd.grad(h[0] * L[0], list(model.head_a.parameters()), retain_graph=True)
    head_b = torch.autograd.grad(h[1] * L[1], list(model.head_b.parameters()))
    return d, w, head_a, head_b, G.shape


@pytest.mark.parametrize("name", GRAD_METHODS)
@pytest.mark.parametrize("pass_heads", [True, False])
def test_backward_gradient_methods(name, pass_heads):
    torch.manual_seed(0)
    model, ref_method, method = Tiny(), get_weighting(name), get_weighting(name)
    seen = []
    orig = method.combine
    method.combine = lambda G, L: (seen.append(G.shape), orig(G, L))[1]
    xs = [torch.randn(4, 4), torch.randn(4, 4)]
    exp_shared = [torch.zeros_like(model.trunk.weight), torch.zeros_like(model.trunk.bias)]
    exp_heads = [torch.zeros_like(p) for p in [*model.head_a.parameters(), *model.head_b.parameters()]]
    for x in xs:  # two micro-batches: gradients accumulate (added), the method takes two steps
        d, w_ref, ha, hb, gshape = _reference_step(model, x, ref_method)
        exp_shared[0] += d[:20].view(5, 4)
        exp_shared[1] += d[20:]
        for e, g in zip(exp_heads, [*ha, *hb]):
            e += g
        task_params = [list(model.head_a.parameters()), list(model.head_b.parameters())] if pass_heads else None
        w = method.backward(model.losses(x), model.shared(), task_params)
        assert torch.allclose(w, w_ref, rtol=1e-5)
    assert seen == [(2, 25), (2, 25)] == [gshape, gshape]  # P = trainable shared parameters only (20 + 5)
    assert model.frozen.grad is None
    assert torch.allclose(model.trunk.weight.grad, exp_shared[0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(model.trunk.bias.grad, exp_shared[1], rtol=1e-5, atol=1e-7)
    for e, p in zip(exp_heads, [*model.head_a.parameters(), *model.head_b.parameters()]):
        assert torch.allclose(p.grad, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["EW", "STCH"])
def test_backward_loss_methods(name):
    model, method = Tiny(), get_weighting(name, **({"warmup_epochs": 1} if name == "STCH" else {}))
    x = torch.randn(4, 4)
    L = model.losses(x)
    ref = L.sum() if name == "EW" else torch.log(L + 1e-20).sum()
    expected = torch.autograd.grad(ref, [model.trunk.weight, model.head_b.bias])
    w = method.backward(model.losses(x), model.shared())
    assert torch.allclose(model.trunk.weight.grad, expected[0]) and torch.allclose(model.head_b.bias.grad, expected[1])
    assert model.frozen.grad is None
    assert torch.allclose(w, torch.ones(2) if name == "EW" else 1 / (L.detach() + 1e-20))


# ---------------------------------------------------------------------------------------------------------------
# state_dict: bitwise resume
# ---------------------------------------------------------------------------------------------------------------

def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_bitwise_resume(name):
    hp = {"warmup_epochs": 2} if name == "STCH" else {}
    a = get_weighting(name, **hp)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 8, generator=gen), torch.rand(3, generator=gen) + 0.1) for _ in range(12)]
    epoch_of = lambda i: i // 3  # noqa: E731  (STCH: warm-up 0-1, nadir in epoch 1, STCH from epoch 2)
    for i in range(5):  # stop mid-way through the nadir epoch
        a.set_epoch(epoch_of(i), 4)
        a.combine(*data[i])
    b = get_weighting(name, **hp)
    b.load_state_dict(_roundtrip(a.state_dict()))
    for i in range(5, 12):
        outs = []
        for m in (a, b):
            m.set_epoch(epoch_of(i), 4)
            outs.append(m.combine(*data[i]))
        (da, wa), (db, wb) = outs
        assert torch.equal(da, db) and torch.equal(wa, wb)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert (torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k]), k


def test_load_state_dict_of_other_method_raises():
    with pytest.raises(ValueError, match="MoCo"):
        DBMTL().load_state_dict(MoCo().state_dict())
