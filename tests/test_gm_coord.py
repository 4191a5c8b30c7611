"""UMD's GM-Coord (OGM-GE form, tasks for modalities) against closed-form cases: equal progress gives (1, 1), the
dominant task's coefficient is 1 - tanh(alpha * rho) and falls as rho grows, the weights are detached, the epoch
window, the GE noise, the shared-only mode, and bitwise state_dict resume."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from endoarss_lib.training.losses import progress_scores
from endoarss_lib.weighting import GMCoord, available_weightings, get_weighting, gm_coord_coefficients


def t64(*x):
    return torch.tensor(x, dtype=torch.float64)


def test_registry_and_defaults():
    w = get_weighting("gm_coord", alpha=0.1)
    assert isinstance(w, GMCoord) and type(get_weighting("GM-Coord")) is GMCoord
    assert w.hparams == {"alpha": 0.1, "relative": False, "momentum": 0.0, "noise": 0.0, "start_epoch": 0,
                         "end_epoch": None, "apply_to": "losses", "seed": 0}
    assert "GM-Coord" in available_weightings() and not w.needs_task_grads
    with pytest.raises(ValueError, match="alpha"):
        get_weighting("gm_coord", alpha=0.0)
    with pytest.raises(ValueError, match="end_epoch"):
        get_weighting("gm_coord", start_epoch=3, end_epoch=1)
    with pytest.raises(ValueError, match="apply_to"):
        get_weighting("gm_coord", apply_to="heads")
    with pytest.raises(TypeError, match="beta"):
        get_weighting("gm_coord", beta=0.5)


def test_equal_progress_gives_ones():
    w = GMCoord(alpha=0.1)
    w.set_progress([0.4, 0.4])
    _, k = w.combine(torch.eye(2, dtype=torch.float64), t64(1.0, 2.0))
    assert k.tolist() == [1.0, 1.0]
    k, rho = gm_coord_coefficients(t64(0.7, 0.7, 0.7))
    assert k.tolist() == [1.0, 1.0, 1.0] and rho.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("alpha", [0.1, 0.5, 2.0])
def test_dominant_coefficient_closed_form_and_monotone(alpha):
    previous = 1.0
    for rho in (1.01, 1.5, 2.0, 4.0, 10.0):
        k, r = gm_coord_coefficients(t64(0.1 * rho, 0.1), alpha)
        assert r[0].item() == pytest.approx(rho) and r[1].item() == pytest.approx(1 / rho)
        assert k[0].item() == pytest.approx(1 - math.tanh(alpha * rho), rel=1e-12)
        assert k[1].item() == 1.0  # the lagging task is left alone
        assert k[0].item() < previous
        previous = k[0].item()
    # the same with the tasks swapped: seg dominant
    k, _ = gm_coord_coefficients(t64(0.1, 0.3), alpha)
    assert k[0].item() == 1.0 and k[1].item() == pytest.approx(1 - math.tanh(3 * alpha))


def test_three_tasks_compare_with_the_mean_of_the_others():
    k, rho = gm_coord_coefficients(t64(0.6, 0.2, 0.4), 0.1)
    assert rho.tolist() == pytest.approx([0.6 / 0.3, 0.2 / 0.5, 0.4 / 0.4])
    assert k.tolist() == pytest.approx([1 - math.tanh(0.2), 1.0, 1.0])


def test_weights_are_detached_and_act_on_the_losses():
    w = GMCoord(alpha=0.5)
    losses = t64(0.3, 1.2).requires_grad_()
    w.set_progress([0.9, 0.3])  # cls dominant, rho = 3
    total = w.combine_losses(losses)
    total.backward()
    k = 1 - math.tanh(1.5)
    assert losses.grad.tolist() == pytest.approx([k, 1.0])  # d total / d L_t = k_t: no gradient through k
    assert not w.last_weights.requires_grad
    assert total.item() == pytest.approx(k * 0.3 + 1.2)


def test_combine_is_k_times_g_and_fallback_uses_exp_minus_loss():
    g = t64(1.0, 2.0, 3.0, -1.0, 0.5, 0.0).view(2, 3)
    losses = t64(0.2, 1.0)  # no scores given: exp(-L) = (0.819, 0.368), cls dominant
    w = GMCoord(alpha=0.1)
    shared, k = w.combine(g, losses)
    rho = math.exp(-0.2) / math.exp(-1.0)
    assert k.tolist() == pytest.approx([1 - math.tanh(0.1 * rho), 1.0])
    assert torch.allclose(shared, k @ g)


def test_epoch_window():
    w = GMCoord(alpha=0.1, start_epoch=1, end_epoch=2)
    ks = []
    for epoch in range(4):
        w.set_epoch(epoch, 4)
        w.set_progress([0.8, 0.2])
        ks.append(w.combine_losses(t64(1.0, 1.0)).item() - 1.0)  # = k_cls
        assert w.epoch_log(["cls", "seg"])["gm_active"] == float(w.active)
    modulated = 1 - math.tanh(0.4)
    assert ks == pytest.approx([1.0, modulated, modulated, 1.0])


def test_relative_scores_and_momentum():
    w = GMCoord(alpha=0.1, relative=True)
    w.set_progress([0.8, 0.2])  # the first step is the baseline: relative scores (1, 1)
    assert w.combine_losses(t64(1.0, 1.0)).item() == 2.0
    w.set_progress([0.8, 0.4])  # relative (1, 2): seg dominant with rho = 2
    w.combine_losses(t64(1.0, 1.0))
    assert w.last_weights.tolist() == pytest.approx([1.0, 1 - math.tanh(0.2)])
    m = GMCoord(alpha=0.1, momentum=0.5)
    m.set_progress([0.4, 0.4])
    m.combine_losses(t64(1.0, 1.0))
    m.set_progress([0.8, 0.4])  # EMA (0.6, 0.4)
    m.combine_losses(t64(1.0, 1.0))
    assert m.last_rho[0].item() == pytest.approx(1.5)


def _tiny_problem(seed=0):
    torch.manual_seed(seed)
    shared = nn.Linear(4, 4)
    heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
    x = torch.randn(8, 4)
    z = shared(x)
    losses = torch.stack([heads[0](z).pow(2).mean(), (heads[1](z) - 1).pow(2).mean()])
    return shared, heads, losses


def test_backward_modes_against_autograd():
    # apply_to="losses": everything sees sum k L; apply_to="shared": heads see sum L.
    for mode in ("losses", "shared"):
        shared, heads, losses = _tiny_problem()
        w = GMCoord(alpha=1.0, apply_to=mode)
        w.set_progress([0.9, 0.3])
        k = w.backward(losses, shared.parameters(), [list(h.parameters()) for h in heads])
        got = [p.grad.clone() for p in list(shared.parameters()) + list(heads.parameters())]
        shared2, heads2, losses2 = _tiny_problem()
        sp = list(shared2.parameters())
        hp = list(heads2.parameters())
        ref_shared = torch.autograd.grad((k.detach() * losses2).sum(), sp, retain_graph=True)
        head_obj = (k.detach() * losses2).sum() if mode == "losses" else losses2.sum()
        ref_heads = torch.autograd.grad(head_obj, hp)
        for a, b in zip(got, list(ref_shared) + list(ref_heads)):
            assert torch.allclose(a, b, atol=1e-7)


def test_ge_noise_is_seeded_and_scaled():
    grads = []
    for seed in (0, 0, 1):
        shared, heads, losses = _tiny_problem()
        w = GMCoord(alpha=1.0, noise=1.0, seed=seed)
        w.set_progress([0.9, 0.3])
        w.backward(losses, shared.parameters(), [list(h.parameters()) for h in heads])
        grads.append(shared.weight.grad.clone())
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])
    shared, heads, losses = _tiny_problem()
    w = GMCoord(alpha=1.0)
    w.set_progress([0.9, 0.3])
    w.backward(losses, shared.parameters(), [list(h.parameters()) for h in heads])
    clean = shared.weight.grad
    noise = grads[0] - clean
    assert noise.abs().sum() > 0 and noise.std() < 5 * clean.std()


def test_state_dict_resume_is_bitwise():
    def steps(w, n, start=0):
        out = []
        for i in range(start, n):
            w.set_epoch(i // 3, 4)
            w.set_progress([0.3 + 0.05 * i, 0.5 - 0.02 * i])
            g = torch.arange(6, dtype=torch.float32).view(2, 3) + i
            out.append(w.combine(g, torch.tensor([1.0, 2.0])))
        return out

    hp = dict(alpha=0.3, relative=True, momentum=0.7, noise=0.5, seed=3)
    straight = steps(GMCoord(**hp), 9)
    a = GMCoord(**hp)
    steps(a, 4)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = GMCoord(**hp)
    b.load_state_dict(torch.load(buf, weights_only=True))
    resumed = steps(b, 9, start=4)
    for (g1, k1), (g2, k2) in zip(straight[4:], resumed):
        assert torch.equal(g1, g2) and torch.equal(k1, k2)
    assert b.epoch_log(["cls", "seg"]) == pytest.approx(
        {k: v for k, v in _log_after(hp, 9).items()})


def _log_after(hp, n):
    w = GMCoord(**hp)
    for i in range(n):
        w.set_epoch(i // 3, 4)
        w.set_progress([0.3 + 0.05 * i, 0.5 - 0.02 * i])
        w.combine(torch.arange(6, dtype=torch.float32).view(2, 3) + i, torch.tensor([1.0, 2.0]))
    return w.epoch_log(["cls", "seg"])


def test_progress_scores_closed_form():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    seg = torch.log(torch.tensor([0.6, 0.4])).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone()
    mask = torch.tensor([[[0, 1], [255, 0]]])
    s = progress_scores({"cls": logits, "seg": seg}, {"label": torch.tensor([0, 1]), "mask": mask}, ("cls", "seg"))
    assert s.tolist() == pytest.approx([(0.7 + 0.1) / 2, (0.6 + 0.4 + 0.6) / 3])
