"""MEJO's CGL loss against an independent NumPy reference written here from docs/seed_components.md, plus its
invariants: p = 0 is the balanced BCE, dropped entries get exactly zero gradient, no tail class -> only the
positive-side drop acts, grouping from training counts, seeded and resumable masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from endoarss_lib.training.losses import CGLLoss, cgl_loss, cgl_weights, class_groups, make_cls_loss, task_losses


def np_bce(z, y):
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def np_cgl(z, target, tail, m):
    """Reference: per-entry weights and the loss, straight from the formulas (loops, no vectorised tricks)."""
    b, c = z.shape
    y = np.zeros((b, c))
    y[np.arange(b), target] = 1
    w = np.ones((b, c))
    for i in range(b):
        e_i = 0.0 if tail[target[i]] else 1.0
        for j in range(c):
            w_neg = 1 - e_i * tail[j] * m[i, j] * (1 - y[i, j])
            w_pos = 1 - (1 - tail[j]) * m[i, j] * y[i, j]
            w[i, j] = w_neg * w_pos
    l = np_bce(z, y)
    pos = (w * l)[y == 1].sum() / (y == 1).sum()
    neg = (w * l)[y == 0].sum() / (y == 0).sum()
    return 0.5 * (pos + neg), w


def data(b=8, c=5, seed=0):
    g = np.random.default_rng(seed)
    z = g.normal(size=(b, c)) * 2
    target = g.integers(0, c, size=b)
    target[:c] = np.arange(c)  # every class has a positive
    return z, target


COUNTS = np.array([50, 30, 12, 5, 3])  # relative grouping (C = 5): head > 40 %, tail < 10 %


def test_relative_grouping_from_counts():
    groups = class_groups(COUNTS)
    # frequencies 0.5, 0.3, 0.12, 0.05, 0.03 vs 2/5 = 0.4 and 0.5/5 = 0.1
    assert list(groups) == ["head", "medium", "medium", "tail", "tail"]
    assert list(class_groups(COUNTS, head=1.0, tail=0.9)) == ["head", "head", "tail", "tail", "tail"]
    assert set(class_groups([10, 10, 10])) == {"medium"}  # balanced: no head, no tail


def test_percentile_and_explicit_grouping():
    groups = class_groups(COUNTS, "percentile", head=0.75, tail=0.25)
    # quantiles of (3, 5, 12, 30, 50): 0.25 -> 5, 0.75 -> 30 (strict comparisons)
    assert list(groups) == ["head", "medium", "medium", "medium", "tail"]
    assert set(class_groups([7, 7, 7, 7], "percentile", head=0.75, tail=0.25)) == {"medium"}
    explicit = ["head", "medium", "tail", "tail", "medium"]
    assert list(CGLLoss(COUNTS, grouping=explicit).groups) == explicit
    with pytest.raises(ValueError, match="explicit grouping"):
        class_groups(COUNTS, ["head", "tail"])
    with pytest.raises(ValueError, match="grouping='deciles'"):
        class_groups(COUNTS, "deciles")
    with pytest.raises(ValueError, match="class_counts"):
        class_groups([0, 0, 0])


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_loss_and_weights_equal_the_reference(p):
    z, target = data()
    loss_fn = CGLLoss(COUNTS, p=p, generator=torch.Generator().manual_seed(3))
    logits = torch.tensor(z, dtype=torch.float64)
    loss = loss_fn(logits, torch.tensor(target))
    m = loss_fn.last_drop.numpy()
    assert set(np.unique(m)) <= {0.0, 1.0}
    tail = np.array([g == "tail" for g in loss_fn.groups], dtype=float)
    ref, w_ref = np_cgl(z, target, tail, m)
    assert loss.item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    w = cgl_weights(torch.tensor(target), torch.tensor(tail), torch.tensor(m))
    np.testing.assert_array_equal(w.numpy(), w_ref)


def test_p_zero_is_the_balanced_bce():
    z, target = data(b=16, c=4, seed=1)
    logits, y = torch.tensor(z), F.one_hot(torch.tensor(target), 4).double()
    loss = CGLLoss([40, 30, 20, 10], p=0.0)(logits, torch.tensor(target))
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    balanced = 0.5 * (bce[y == 1].mean() + bce[y == 0].mean())
    assert torch.equal(loss, balanced) or loss.item() == pytest.approx(balanced.item(), rel=1e-14)


def test_dropped_entries_have_exactly_zero_gradient():
    z, target = data(b=12, c=5, seed=2)
    tail = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    drop = (torch.rand(12, 5, generator=g) < 0.5).double()
    logits = torch.tensor(z, requires_grad=True)
    cgl_loss(logits, torch.tensor(target), tail, drop).backward()
    w = cgl_weights(torch.tensor(target), tail, drop)
    assert (w == 0).any() and (w == 1).any()
    assert torch.all(logits.grad[w == 0] == 0)  # exactly zero, not just small
    assert torch.all(logits.grad[w == 1] != 0)
    # which entries are dropped: non-tail positives and tail negatives of samples without a tail positive
    y = F.one_hot(torch.tensor(target), 5).double()
    no_tail = (1 - (y * tail).sum(1, keepdim=True)).bool()
    expected = drop.bool() & (((y == 1) & (tail == 0)) | ((y == 0) & (tail == 1) & no_tail))
    assert torch.equal(w == 0, expected)


def test_without_tail_classes_only_the_positive_side_drops():
    z, target = data(b=10, c=3, seed=4)
    loss_fn = CGLLoss([10, 10, 10], p=0.5, generator=torch.Generator().manual_seed(1))  # all medium
    assert not loss_fn.tail.any()
    loss_fn(torch.tensor(z), torch.tensor(target))
    m = loss_fn.last_drop
    w = cgl_weights(torch.tensor(target), loss_fn.tail, m)
    y = F.one_hot(torch.tensor(target), 3).bool()
    assert torch.all(w[~y] == 1)  # negatives never dropped
    assert torch.equal(w[y] == 0, m[y].bool())  # positives dropped exactly where the mask says


def test_masks_are_seeded_fresh_each_call_and_resumable():
    z, target = data()
    logits, tgt = torch.tensor(z), torch.tensor(target)
    a = CGLLoss(COUNTS, p=0.5, generator=torch.Generator().manual_seed(7))
    b = CGLLoss(COUNTS, p=0.5, generator=torch.Generator().manual_seed(7))
    la1, m1 = a(logits, tgt), a.last_drop
    la2, m2 = a(logits, tgt), a.last_drop
    assert not torch.equal(m1, m2)  # a fresh mask every call
    assert torch.equal(b(logits, tgt), la1) and torch.equal(b.last_drop, m1)
    state = b.state_dict()
    assert set(state) == {"name", "p", "generator"}
    c = CGLLoss(COUNTS, p=0.5, generator=torch.Generator().manual_seed(123))
    c.load_state_dict(state)
    assert torch.equal(c(logits, tgt), la2) and torch.equal(c.last_drop, m2)
    # state survives torch.save / weights_only load
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True)["generator"], state["generator"])


def test_validation_and_config_factory():
    with pytest.raises(ValueError, match="p must be"):
        CGLLoss(COUNTS, p=1.5)
    with pytest.raises(ValueError, match=r"logits must be \(B, C=5\)"):
        CGLLoss(COUNTS)(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        CGLLoss(COUNTS)(torch.zeros(2, 5), torch.tensor([0, 5]))
    assert make_cls_loss("ce") is None
    loss = make_cls_loss("cgl", COUNTS, seed=5, p=0.2, grouping="percentile", head=0.8, tail=0.2)
    assert isinstance(loss, CGLLoss) and loss.p == 0.2
    assert torch.equal(loss.generator.get_state(), torch.Generator().manual_seed(5).get_state())
    with pytest.raises(ValueError, match="unknown cls_loss"):
        make_cls_loss("focal")
    with pytest.raises(ValueError, match="class counts"):
        make_cls_loss("cgl")


def test_task_losses_uses_the_given_cls_loss():
    z, target = data(b=6, c=5)
    out = {"cls": torch.tensor(z, dtype=torch.float32)}
    batch = {"label": torch.tensor(target)}
    loss_fn = CGLLoss(COUNTS, p=0.0)
    cgl = task_losses(out, batch, ("cls",), cls_loss=loss_fn)["cls"]
    assert cgl.item() == pytest.approx(loss_fn(out["cls"], batch["label"]).item())
    ce = task_losses(out, batch, ("cls",))["cls"]
    assert ce.item() == pytest.approx(F.cross_entropy(out["cls"], batch["label"]).item())
