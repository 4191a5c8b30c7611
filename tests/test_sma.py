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


# ---------------------------------------------------------------------------------------------------------------
# impl="fused" (the default) against impl="reference" (the paper's modules: proj_in, patchify, EMA, unpatchify,
# proj_out), same state dict: outputs, input gradients and every parameter gradient
# ---------------------------------------------------------------------------------------------------------------

FUSED_CASES = [  # (SMA options, input size, chunk_elements: small values force several chunks and their halos)
    (dict(dim=8, patch_size=4), (16, 16), 37),
    (dict(dim=6, patch_size=3, groups=3), (9, 12), 50),  # groups > 1, non-square, N = 12 patches
    (dict(dim=10, patch_size=2, groups=2), (6, 10), 1),  # one patch per chunk
    (dict(dim=5, patch_size=7, residual=True), (7, 7), 1 << 18),  # a single patch (N = 1)
    (dict(dim=4, patch_size=4, groups=16, kernel_size=5), (8, 12), 64),  # one channel per group, 5x5 local/fusion
    (dict(dim=1, patch_size=2), (4, 6), 3),  # d = 1: first and last feature coincide
    (dict(dim=12, patch_size=7, groups=7), (14, 21), 1 << 18),  # the released patch size, one chunk
]


def _pair(options: dict, chunk: int, dtype: torch.dtype, seed: int = 0):
    ref = SMA(impl="reference", **options).to(dtype)
    _randomise(ref, seed)
    fused = SMA(impl="fused", chunk_elements=chunk, **options).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _out_and_grads(sma: SMA, x: torch.Tensor, target: torch.Tensor):
    x = x.clone().requires_grad_(True)
    sma.zero_grad(set_to_none=True)
    y = sma(x)
    (y * target).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in sma.named_parameters() if p.requires_grad}


def _assert_equal(a, b, dtype, what):
    # float64: the two implementations agree to rounding (about 1e-14); float32: within 1e-5 of the magnitude
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(a.abs().max()))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    diff = float((a.double() - b.double()).abs().max())
    assert diff <= tol * scale, f"{what}: max |diff| {diff:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options, size, chunk", FUSED_CASES)
def test_fused_equals_reference_outputs_and_gradients(options, size, chunk, dtype):
    ref, fused = _pair(options, chunk, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *size, generator=g, dtype=dtype)
    target = torch.randn(x.shape, generator=g, dtype=dtype)
    y_ref, dx_ref, grads_ref = _out_and_grads(ref, x, target)
    y_new, dx_new, grads_new = _out_and_grads(fused, x, target)
    _assert_equal(y_ref, y_new, dtype, "output")
    _assert_equal(dx_ref, dx_new, dtype, "input gradient")
    assert grads_ref.keys() == grads_new.keys()
    for name in grads_ref:
        _assert_equal(grads_ref[name], grads_new[name], dtype, name)


def test_fused_is_the_default_and_shares_the_state_dict():
    fused, ref = SMA(dim=8), SMA(dim=8, impl="reference")
    assert fused.impl == "fused" and "impl='fused'" in repr(fused)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    assert all(fused.state_dict()[k].shape == v.shape for k, v in ref.state_dict().items())
    with pytest.raises(ValueError, match="impl"):
        SMA(dim=8, impl="fast")
    with pytest.raises(ValueError, match="chunk_elements"):
        SMA(dim=8, chunk_elements=0)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_fused_frozen_sma_and_checkpoint(checkpoint):
    # sma_trainable=False (released code): only the input gradient flows; checkpointing changes nothing
    ref, fused = _pair(dict(dim=8, patch_size=4, groups=2, checkpoint=checkpoint), 40, torch.float64)
    for m in (ref, fused):
        m.requires_grad_(False)
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    target = torch.randn_like(x)
    y_ref, dx_ref, grads_ref = _out_and_grads(ref, x, target)
    y_new, dx_new, grads_new = _out_and_grads(fused, x, target)
    assert grads_ref == grads_new == {}
    _assert_equal(y_ref, y_new, torch.float64, "output")
    _assert_equal(dx_ref, dx_new, torch.float64, "input gradient")
    with torch.no_grad():
        _assert_equal(ref(x), fused(x), torch.float64, "no_grad output")


def test_fused_inside_the_model_matches_the_reference_state_dict():
    from endoarss_lib.models import build_model

    torch.manual_seed(0)
    model = build_model("vit_tiny_patch14", "hps", sma=True, sma_dim=8, num_activities=3, num_seg_classes=4,
                        image_size=28, head_channels=8).double()
    assert model.backbone.sma.impl == "fused"
    _randomise(model.backbone.sma)
    ref = SMA(dim=8, impl="reference").double()
    ref.load_state_dict(model.backbone.sma.state_dict())
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    _assert_equal(ref(x), model.backbone.sma(x), torch.float64, "model SMA")
