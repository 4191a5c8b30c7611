"""Tests for EMA and SMA (endoarss_lib.models.sma)."""
import pytest
import torch
import torch.nn.functional as F

from endoarss_lib.models.sma import EMA, SMA, patchify, unpatchify


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    # Random affine params too, so the reference comparison exercises every parameter (GN inits to 1/0).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _ema_reference(ema: EMA, x: torch.Tensor) -> torch.Tensor:
    """EMA from the equations, one sample and one group at a time (independent of the module's reshapes)."""
    b, c, h, w = x.shape
    g = ema.groups
    cg = c // g
    w1 = ema.conv1x1.weight[:, :, 0, 0]  # (cg, cg)
    b1 = ema.conv1x1.bias
    out = torch.empty_like(x)
    for i in range(b):
        for k in range(g):
            xg = x[i, k * cg:(k + 1) * cg]  # (cg, h, w)
            pool_h = xg.mean(dim=2)  # (cg, h): average over width
            pool_w = xg.mean(dim=1)  # (cg, w): average over height
            s_h = torch.sigmoid(w1 @ pool_h + b1[:, None])  # 1x1 conv = channel matmul
            s_w = torch.sigmoid(w1 @ pool_w + b1[:, None])
            y = xg * s_h[:, :, None] * s_w[:, None, :]
            mu = y.mean(dim=(1, 2), keepdim=True)
            var = y.var(dim=(1, 2), unbiased=False, keepdim=True)
            x1 = (y - mu) / torch.sqrt(var + ema.gn.eps) * ema.gn.weight[:, None, None] + ema.gn.bias[:, None, None]
            x2 = F.conv2d(xg[None], ema.conv3x3.weight, ema.conv3x3.bias, padding=1)[0]
            a1 = torch.softmax(x1.mean(dim=(1, 2)), dim=0)  # (cg,)
            a2 = torch.softmax(x2.mean(dim=(1, 2)), dim=0)
            wmap = (a1[:, None] * x2.reshape(cg, -1)).sum(0) + (a2[:, None] * x1.reshape(cg, -1)).sum(0)
            out[i, k * cg:(k + 1) * cg] = xg * torch.sigmoid(wmap.reshape(h, w))[None]
    return out


def test_ema_keeps_shape():
    x = torch.randn(2, 8, 5, 7)
    assert EMA(8, groups=2)(x).shape == x.shape


def test_ema_groups_must_divide_channels():
    with pytest.raises(ValueError, match="groups"):
        EMA(10, groups=3)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_ema_matches_loop_reference(groups):
    torch.manual_seed(0)
    ema = EMA(8, groups=groups)
    _randomise(ema)
    x = torch.randn(3, 8, 6, 9)
    torch.testing.assert_close(ema(x), _ema_reference(ema, x), atol=1e-5, rtol=1e-5)


def test_patchify_unpatchify_roundtrip():
    x = torch.randn(2, 5, 14, 21)
    u = patchify(x, 7)
    assert u.shape == (2, 49, 6, 5)
    # Position (ph, pw) of patch (nh, nw) is pixel (nh*7+ph, nw*7+pw); N is row-major over the patch grid.
    assert torch.equal(u[1, 3 * 7 + 4, 1 * 3 + 2], x[1, :, 7 + 3, 14 + 4])
    assert torch.equal(unpatchify(u, (14, 21), 7), x)


@pytest.mark.parametrize("size", [56, 224])
def test_sma_keeps_shape(size):
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    y = SMA(dim=16)(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_sma_non_divisible_raises():
    with pytest.raises(ValueError, match="patch_size"):
        SMA(dim=8)(torch.randn(1, 3, 30, 28))


def test_sma_wrong_channels_raises():
    with pytest.raises(ValueError, match="in_chans"):
        SMA(dim=8)(torch.randn(1, 4, 28, 28))


def test_sma_residual_identity_at_init_then_trains():
    torch.manual_seed(0)
    sma = SMA(dim=8, residual=True)
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(sma(x), x)
    opt = torch.optim.SGD(sma.parameters(), lr=0.1)
    (sma(x) * torch.randn_like(x)).sum().backward()
    opt.step()
    assert not torch.allclose(sma(x), x)


def test_sma_every_parameter_gets_gradient():
    torch.manual_seed(0)
    sma = SMA(dim=8, groups=7)
    x = torch.randn(2, 3, 28, 14)
    (sma(x) * torch.randn_like(x)).sum().backward()
    for name, p in sma.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_sma_checkpoint_same_output_and_gradients():
    torch.manual_seed(0)
    a = SMA(dim=8, patch_size=4, checkpoint=False)
    b = SMA(dim=8, patch_size=4, checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, atol=0, rtol=0)
    t = torch.randn_like(ya)
    (ya * t).sum().backward()
    (yb * t).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
