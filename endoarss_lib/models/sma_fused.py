"""SMA's dim-wide part (proj_in -> unfold -> EMA -> fold -> proj_out) as one memory-light autograd function.

:class:`~endoarss_lib.models.sma.SMA` (``impl="fused"``, the default) computes exactly the function of the reference
modules (``impl="reference"``: ``EMA`` on the unfolded tensor), with the same parameters, but never materialises the
``(B, P, N, d)`` tensor (``d * H * W`` elements, about 100 MB fp32 per 224x224 image at ``d = 512``) nor any other
tensor of that size: it works on chunks of patches, and recomputes a chunk from the C-channel input
(``proj_in`` is a C -> d linear map, C = 3) whenever it needs it again. Only tensors ``1/c``, ``1/d`` or ``1/N`` of
that size are kept (per-patch and per-feature statistics, the attention map). Notation: X[b, n, g, c, j], n the
patch (N = HW / p^2, row-major), g the EMA channel group, c the channel inside the group (P = p^2 = g * c positions
inside a patch), j the feature (d); EMA's 'spatial' grid is (n, j).

The algebra that makes this cheap (the reference's EMA, Ouyang et al. 2023, term by term):

* ``x1 = GN(Z)``, ``Z = X * sig(a_h) * sig(a_w)``: only ``mean(x1) = beta`` (exactly) and ``sum_c d2_c x1_c`` are
  used, and the latter is ``sum_c kappa_c Z_c + const`` with ``kappa = d2 * gamma * rstd``: GroupNorm is never
  applied, its statistics (mean, variance of Z per channel) are merged over the chunks (Chan et al.);
* ``x2 = conv3x3(X)`` (c -> c channels, the reference's 23 GFLOPs per image at groups=1): only ``sum_c d1_c x2_c``
  is used, a single-output 3x3 convolution with the weight ``sum_c d1_c W3[c]``, and ``mean(x2)``, which follows
  from the per-patch sums and the first / last feature of every patch (the zero padding drops one row / column);
* ``proj_out(X * sig(w))`` is one small matrix product per patch (the attention map folded into proj_out's weight).

The backward is written out by hand (three passes over the chunks). Not twice differentiable. Runs in float32
(float64 if an input is float64), autocast off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_global", "to_patch_rows", "from_patch_rows", "DEFAULT_CHUNK_ELEMENTS"]

# Elements of one chunk of X (1 MiB fp32; the fastest of 2**16 .. 2**20 on CPU): rows = max(1, this // (B * P * d)).
DEFAULT_CHUNK_ELEMENTS = 1 << 18


def to_patch_rows(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, P, C): patch n (row-major over the patch grid), position P = (ph, pw) inside it."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # (b, nh, nw, ph, pw, c)
    return x.reshape(b, (h // p) * (w // p), p * p, c)


def from_patch_rows(x: Tensor, size: tuple[int, int], patch_size: int) -> Tensor:
    """Inverse of :func:`to_patch_rows`: (B, N, P, C) -> (B, C, H, W)."""
    b, _, _, c = x.shape
    h, w = size
    p = patch_size
    x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (b, c, nh, ph, nw, pw)
    return x.reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------------------------
# Small pieces shared by forward and backward
# ---------------------------------------------------------------------------------------------------------------

class _Geometry:
    """Sizes and the chunking of the N patches."""

    def __init__(self, xr: Tensor, dim: int, groups: int, chunk_elements: int):
        self.b, self.n, self.p, _ = xr.shape
        self.d, self.g = dim, groups
        self.c = self.p // groups
        self.m = self.n * self.d  # elements per channel of EMA's grid (GroupNorm / mean denominators)
        rows = max(1, int(chunk_elements) // max(1, self.b * self.p * self.d))
        self.chunks = [(a, min(a + rows, self.n)) for a in range(0, self.n, rows)]


def _rows(t: Tensor, a: int, e: int) -> Tensor:
    """``t[:, a:e]``, but ``t`` itself for the full range (a full slice is an alias, which the batched backward of
    ``is_grads_batched`` cannot handle)."""
    return t if a == 0 and e == t.shape[1] else t[:, a:e]


def _x_rows(xr: Tensor, w_in: Tensor, b_in: Tensor, geo: _Geometry, a: int, e: int) -> Tensor:
    """X for patches [a, e): proj_in of the C-channel input, (B, e - a, g, c, d)."""
    x = F.linear(xr[:, a:e], w_in, b_in)
    return x.view(geo.b, e - a, geo.g, geo.c, geo.d)


def _z(x: Tensor, s_h: Tensor, s_w: Tensor, a: int, e: int) -> Tensor:
    """Z = X * sig(a_h) * sig(a_w) for patches [a, e)."""
    return (x * s_h[:, a:e, :, :, None]).mul_(s_w[:, None])


def _row_masks(n: int, ref: Tensor) -> Tensor:
    """(3, N): which patch rows n' a 3x3 tap row ky reads (zero padding drops the last row for ky=0, the first for
    ky=2)."""
    masks = torch.ones(3, n, dtype=ref.dtype, device=ref.device)
    masks[0, n - 1] = 0
    masks[2, 0] = 0
    return masks


def _tap_sums(rows: Tensor, first: Tensor, last: Tensor, masks: Tensor) -> Tensor:
    """S[b, g, c, ky, kx]: sum of X over the zero-padded window of every 3x3 tap, from per-patch sums ``rows`` and
    the first / last feature of every patch (each (B, N, g, c))."""
    per_col = torch.stack([rows - last, rows, rows - first], dim=-1)  # (B, N, g, c, kx)
    return torch.einsum("kn,bngcx->bgckx", masks, per_col)


def _conv_taps(w3: Tensor, d1: Tensor) -> Tensor:
    """V = sum_c d1_c W3[c]: the single-output 3x3 kernel of ``sum_c d1_c conv3x3(X)_c``, as (9, c)."""
    return torch.einsum("o,oikl->kli", d1, w3).reshape(9, -1)


def _conv1(a9: Tensor, a: int, e: int, lo: int, n: int) -> Tensor:
    """``sum_taps`` of the per-tap maps ``a9`` (B, rows lo.., g, 9, d) shifted to output rows [a, e) (zero padding):
    out[n, j] = sum_{ky, kx} a9[n + ky - 1, (ky, kx), j + kx - 1]."""
    ap = F.pad(a9, (1, 1))  # feature padding
    d = a9.shape[-1]
    by_row = torch.stack([ap[..., 3 * ky, 0:d] + ap[..., 3 * ky + 1, 1:d + 1] + ap[..., 3 * ky + 2, 2:d + 2]
                          for ky in range(3)], dim=3)  # (B, rows, g, 3, d)
    by_row = F.pad(by_row, (0, 0, 0, 0, 0, 0, int(a == 0), int(e == n)))  # zero rows -1 / N
    start = a - 1 - lo + int(a == 0)  # index of row a - 1 in by_row
    r = e - a
    return by_row[:, start:start + r, :, 0] + by_row[:, start + 1:start + 1 + r, :, 1] + \
        by_row[:, start + 2:start + 2 + r, :, 2]


def _shifted_grad(dw: Tensor, lo: int, hi: int, n: int) -> Tensor:
    """D[b, n', g, (ky, kx), j'] = dw[b, n' - ky + 1, g, j' - kx + 1] for rows n' in [lo, hi) (zero outside):
    the transpose of :func:`_conv1`."""
    d = dw.shape[-1]
    src_lo, src_hi = max(lo - 1, 0), min(hi + 1, n)
    part = F.pad(_rows(dw, src_lo, src_hi), (1, 1, 0, 0, int(lo == 0), int(hi == n)))  # rows lo-1..hi, features -1..d
    r = hi - lo
    taps = []
    for ky in range(3):
        rows = part[:, 2 - ky:2 - ky + r]  # rows n' - ky + 1
        for kx in range(3):
            taps.append(rows[..., 2 - kx:2 - kx + d])
    return torch.stack(taps, dim=3)  # (B, r, g, 9, d)


# ---------------------------------------------------------------------------------------------------------------
# The function
# ---------------------------------------------------------------------------------------------------------------

class _FusedGlobal(torch.autograd.Function):
    """(xr, proj_in, EMA and proj_out weights) -> proj_out(fold(EMA(unfold(proj_in(x))))) without the bias of
    proj_out, in patch rows (B, N, P, C)."""

    @staticmethod
    def forward(ctx, xr, w_in, b_in, w1, b1, gamma, beta, w3, b3, w_out, groups, eps, chunk_elements):
        geo = _Geometry(xr, w_in.shape[0], groups, chunk_elements)
        b, n, g, c, d = geo.b, geo.n, geo.g, geo.c, geo.d
        # pass 1: per-patch means (pool over features), per-feature sums (pool over patches), first / last feature
        xh = xr.new_empty(b, n, g, c)
        first, last = xr.new_empty(b, n, g, c), xr.new_empty(b, n, g, c)
        col_sum = xr.new_zeros(b, g, c, d)
        for a, e in geo.chunks:
            x = _x_rows(xr, w_in, b_in, geo, a, e)
            xh[:, a:e] = x.mean(-1)
            first[:, a:e], last[:, a:e] = x[..., 0], x[..., d - 1]
            col_sum += x.sum(1)
        xw = col_sum / n
        s_h = torch.sigmoid(F.linear(xh, w1, b1))  # (B, N, g, c)
        s_w = torch.sigmoid(torch.matmul(w1, xw) + b1[:, None])  # (B, g, c, d)
        # pass 2: mean and variance of Z per patch and channel (over the features), merged over the patches
        row_var, row_mean = xr.new_empty(b, n, g, c), xr.new_empty(b, n, g, c)
        for a, e in geo.chunks:
            z = _z(_x_rows(xr, w_in, b_in, geo, a, e), s_h, s_w, a, e)
            mean = z.mean(-1, keepdim=True)
            row_mean[:, a:e] = mean[..., 0]
            row_var[:, a:e] = torch.linalg.vector_norm(z.sub_(mean), dim=-1).square_() / d  # two-pass: stable
        mu = row_mean.mean(1)  # (B, g, c)
        var = (row_var + (row_mean - mu[:, None]) ** 2).mean(1)  # Chan et al.: equal-sized parts
        rstd = torch.rsqrt(var + eps)
        # EMA's cross-spatial weights: d1 from mean(x1) = beta, d2 from mean(x2) via the tap sums
        masks = _row_masks(n, xr)
        taps = _tap_sums(xh * d, first, last, masks)  # (B, g, c, 3, 3)
        m2 = b3 + torch.einsum("oikl,bgikl->bgo", w3, taps) / geo.m
        d1, d2 = torch.softmax(beta, dim=0), torch.softmax(m2, dim=-1)
        v9 = _conv_taps(w3, d1)  # (9, c)
        kappa = d2 * gamma * rstd  # (B, g, c)
        const = (d1 * b3).sum() + (d2 * (beta - gamma * rstd * mu)).sum(-1)  # (B, g)
        # pass 3: the attention map and the output, one chunk of patches at a time
        sig = xr.new_empty(b, n, g, d)
        out = xr.new_empty(b, n, g, c, w_out.shape[0])
        for a, e in geo.chunks:
            lo, hi = max(a - 1, 0), min(e + 1, n)
            xh_rows = _x_rows(xr, w_in, b_in, geo, lo, hi)
            x = xh_rows[:, a - lo:e - lo]
            conv = _conv1(torch.matmul(v9, xh_rows), a, e, lo, n)  # (B, r, g, d)
            u = torch.matmul(kappa[:, None, :, None, :], _z(x, s_h, s_w, a, e)).squeeze(-2)
            sig[:, a:e] = torch.sigmoid(conv + u + const[:, None, :, None])
            out[:, a:e] = torch.matmul(x, sig[:, a:e, :, :, None] * w_out.t())
        ctx.save_for_backward(xr, w_in, b_in, w1, b1, gamma, beta, w3, b3, w_out, xh, xw, s_h, s_w, mu, rstd,
                              taps, d1, d2, kappa, sig)
        ctx.geo, ctx.masks = geo, masks
        return out.view(b, n, geo.p, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (xr, w_in, b_in, w1, b1, gamma, beta, w3, b3, w_out, xh, xw, s_h, s_w, mu, rstd, taps, d1, d2, kappa,
         sig) = ctx.saved_tensors
        geo, masks = ctx.geo, ctx.masks
        b, n, g, c, d = geo.b, geo.n, geo.g, geo.c, geo.d
        go = grad_out.to(xr.dtype).contiguous().view(b, n, g, c, -1)
        need_w = any(ctx.needs_input_grad[1:10])
        # Accumulations are out of place (lists, sums) so that the backward also runs under vmap, i.e. for the
        # batched per-task gradients (torch.autograd.grad(..., is_grads_batched=True)).
        # pass 1: gradient of the attention map; kappa's and const's gradients; proj_out's weight
        dwmap_parts, dkappa, dw_out = [], 0, 0
        for a, e in geo.chunks:
            x = _x_rows(xr, w_in, b_in, geo, a, e)
            s = sig[:, a:e]
            dsig = (torch.matmul(_rows(go, a, e), w_out) * x).sum(-2)  # (B, r, g, d)
            dw_part = dsig * s * (1 - s)
            dwmap_parts.append(dw_part)
            dkappa = dkappa + torch.matmul(_z(x, s_h, s_w, a, e), dw_part[..., None]).squeeze(-1).sum(1)
            if need_w:
                dw_out = dw_out + (torch.matmul(_rows(go, a, e).transpose(-1, -2), x) * s[:, :, :, None]).sum((0, 1, 2))
        dwmap = torch.cat(dwmap_parts, dim=1)  # (B, N, g, d)
        dconst = dwmap.sum((1, 3))  # (B, g)
        # GroupNorm statistics, d2 and mean(x2)
        dd2 = dkappa * gamma * rstd + dconst[..., None] * (beta - gamma * rstd * mu)
        drstd = (dkappa - dconst[..., None] * mu) * d2 * gamma
        dmu = -dconst[..., None] * d2 * gamma * rstd
        dgamma = ((dkappa - dconst[..., None] * mu) * d2 * rstd).sum((0, 1))
        dbeta = (dconst[..., None] * d2).sum((0, 1))
        dvar = -0.5 * drstd * rstd ** 3
        alpha, beta2 = dmu / geo.m, 2 * dvar / geo.m  # dL/dZ (statistics) = alpha + beta2 * (Z - mu)
        dm2 = d2 * (dd2 - (dd2 * d2).sum(-1, keepdim=True))
        db3 = dm2.sum((0, 1))
        # (matmul / sum rather than einsum: the batched backward of is_grads_batched has no einsum)
        dw3 = torch.matmul(dm2.reshape(-1, c).t(), taps.reshape(-1, c * 9)).reshape(w3.shape) / geo.m
        dtaps = torch.matmul(dm2, w3.reshape(c, c * 9)).reshape(b, g, c, 3, 3) / geo.m
        d_rows = torch.matmul(dtaps.sum(-1), masks).permute(0, 3, 1, 2)  # (B, N, g, c): every feature of the patch
        d_last = -torch.matmul(dtaps[..., 0], masks).permute(0, 3, 1, 2)
        d_first = -torch.matmul(dtaps[..., 2], masks).permute(0, 3, 1, 2)

        shift = alpha - beta2 * mu  # dL/dZ = dwmap * kappa + beta2 * Z + shift
        v9 = _conv_taps(w3, d1)
        # pass 2: dX except its terms constant along a patch row or a feature column (added below), the gradients
        # of the pooled attentions s_h, s_w and of the 3x3 taps V
        ds_h_parts, dxr_parts, ds_w, dv9, dw_in, db_in = [], [], 0, 0, 0, 0
        for a, e in geo.chunks:
            x = _x_rows(xr, w_in, b_in, geo, a, e)
            sh = s_h[:, a:e, :, :, None]
            dz = torch.addcmul(_z(x, s_h, s_w, a, e) * beta2[:, None, :, :, None] + shift[:, None, :, :, None],
                               _rows(dwmap, a, e)[:, :, :, None, :], kappa[:, None, :, :, None])
            px = dz * x
            ds_h_parts.append((px * s_w[:, None]).sum(-1))
            ds_w = ds_w + px.mul_(sh).sum(1)
            taps_grad = _shifted_grad(dwmap, a, e, n)  # (B, r, g, 9, d)
            if need_w:
                dv9 = dv9 + torch.matmul(x, taps_grad.transpose(-1, -2)).sum((0, 1, 2))
            dx = torch.matmul(_rows(go, a, e), w_out).mul_(sig[:, a:e, :, None, :])
            dx += dz.mul_(sh).mul_(s_w[:, None])
            dx += torch.matmul(v9.t(), taps_grad)
            flat = dx.reshape(b, e - a, geo.p, d)
            dxr_parts.append(torch.matmul(flat, w_in))
            if need_w:
                dw_in = dw_in + torch.matmul(flat.reshape(-1, d).t(), xr[:, a:e].reshape(-1, xr.shape[-1]))
                db_in = db_in + flat.sum((0, 1, 2))
        ds_h, ds_w = torch.cat(ds_h_parts, dim=1) * s_h, ds_w * s_w
        dv9 = dv9 if need_w else xr.new_zeros(c, 9)
        dah, daw = ds_h * (1 - s_h), ds_w * (1 - s_w)
        dw1 = torch.matmul(dah.reshape(-1, c).t(), xh.reshape(-1, c)) + \
            torch.matmul(daw.transpose(-1, -2).reshape(-1, c).t(), xw.transpose(-1, -2).reshape(-1, c))
        db1 = dah.sum((0, 1, 2)) + daw.sum((0, 1, 3))
        dd1 = torch.matmul(w3.reshape(c, c * 9), dv9.reshape(c * 9)) + dconst.sum() * b3
        dw3 = dw3 + (d1[:, None] * dv9.reshape(1, c * 9)).reshape(w3.shape)
        db3 = db3 + d1 * dconst.sum()
        dbeta = dbeta + d1 * (dd1 - (dd1 * d1).sum())
        # dX terms constant along a row (pooling over features, tap sums) or a column (pooling over patches), and
        # the first / last feature of every patch (tap sums): applied to proj_in's gradients directly
        structured = {"row": (torch.matmul(dah, w1) / d + d_rows).reshape(b, n, geo.p),
                      "col": (torch.matmul(w1.t(), daw) / n).reshape(b, geo.p, d),
                      "first": d_first.reshape(b, n, geo.p), "last": d_last.reshape(b, n, geo.p)}
        dxr = torch.cat(dxr_parts, dim=1) + _structured_input_grad(structured, w_in)
        if need_w:
            dw_in_s, db_in_s = _structured_weight_grad(structured, xr, n, d)
            dw_in, db_in = dw_in + dw_in_s, db_in + db_in_s
        grads = (dxr, dw_in, db_in, dw1, db1, dgamma, dbeta, dw3, db3, dw_out)
        return (*[gr if need and not isinstance(gr, int) else None for gr, need in zip(grads, ctx.needs_input_grad)],
                None, None, None)


def _structured_input_grad(terms: dict, w_in: Tensor) -> Tensor:
    """Gradient w.r.t. the patch rows (B, N, P, C) of the dX terms: ``row`` (B, N, P) added to every feature,
    ``col`` (B, P, d) added to every patch, ``first`` / ``last`` (B, N, P) added to feature 0 / d - 1."""
    d = w_in.shape[0]
    return (terms["row"][..., None] * w_in.sum(0) + torch.matmul(terms["col"], w_in)[:, None]
            + terms["first"][..., None] * w_in[0] + terms["last"][..., None] * w_in[d - 1])


def _structured_weight_grad(terms: dict, xr: Tensor, n: int, d: int) -> tuple[Tensor, Tensor]:
    """Gradients of proj_in's weight (d, C) and bias (d) from the same terms (see
    :func:`_structured_input_grad`)."""
    c_in = xr.shape[-1]
    row = (terms["row"][..., None] * xr).sum((0, 1, 2))
    dw = row.expand(d, -1) + torch.matmul(terms["col"].reshape(-1, d).t(), xr.sum(1).reshape(-1, c_in))
    dw[0] += (terms["first"][..., None] * xr).sum((0, 1, 2))
    dw[d - 1] += (terms["last"][..., None] * xr).sum((0, 1, 2))
    db = terms["row"].sum().expand(d) + n * terms["col"].sum((0, 1))
    db[0] += terms["first"].sum()
    db[d - 1] += terms["last"].sum()
    return dw, db


def fused_global(xr: Tensor, proj_in, ema, proj_out, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """proj_out(fold(EMA(unfold(proj_in(x))))) for the patch rows ``xr = to_patch_rows(x)`` (B, N, P, C), with the
    modules' own parameters; returns patch rows (B, N, P, C) (proj_out's bias included)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in (xr, proj_in.weight)) else torch.float32
    conv1, conv3, gn = ema.conv1x1, ema.conv3x3, ema.gn
    params = [proj_in.weight[:, :, 0, 0], proj_in.bias, conv1.weight[:, :, 0, 0], conv1.bias, gn.weight, gn.bias,
              conv3.weight, conv3.bias, proj_out.weight[:, :, 0, 0]]
    with torch.autocast(device_type=xr.device.type, enabled=False):
        out = _FusedGlobal.apply(xr.to(dtype), *[p.to(dtype) for p in params], ema.groups, gn.eps, chunk_elements)
    return out + proj_out.bias.to(dtype)
