"""LoRA (Eq. 2-3) and grouped adapters (TESLA Eq. 5-6 / experts) at the layer level."""
import pytest
import torch
from torch import nn

from endoarss_lib.models.lora import LoRAConv1x1, LoRALinear, route_to_group

torch.manual_seed(0)


def _qkv(c=8, bias=True):
    lin = nn.Linear(c, 3 * c, bias=bias)
    lin.requires_grad_(False)
    return lin


def _randomize_B(m: nn.Module, scale=0.1):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "_B" in n:
                p.normal_(0, scale)


def test_zero_B_equals_base_and_init():
    base = _qkv()
    m = LoRALinear(base, rank=4, chunks=3, adapt=(0, 2))
    x = torch.randn(2, 5, 8)
    assert torch.equal(m(x), base(x))
    assert m.lora_A.shape == (2, 4, 8) and m.lora_B.shape == (2, 8, 4)
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    assert m.scale == 1.0  # alpha = rank


def test_only_q_and_v_rows_change():
    base = _qkv()
    m = LoRALinear(base, rank=4, chunks=3, adapt=(0, 2))
    _randomize_B(m)
    x = torch.randn(3, 8)
    d = (m(x) - base(x)).view(3, 3, 8)
    assert d[:, 0].abs().max() > 0 and d[:, 2].abs().max() > 0
    assert torch.equal(d[:, 1], torch.zeros_like(d[:, 1]))  # k untouched
    # the formula h = W0 x + (alpha/r) B A x on each adapted chunk
    ref_q = (m.lora_B[0] @ m.lora_A[0] @ x.T).T
    torch.testing.assert_close(d[:, 0], ref_q, rtol=1e-5, atol=1e-6)


def test_alpha_scaling():
    base = _qkv()
    m = LoRALinear(base, rank=4, alpha=8, chunks=3, adapt=(0, 2))
    assert m.scale == 2.0


def test_merge_unmerge_roundtrip():
    base = _qkv()
    w0 = base.weight.detach().clone()
    m = LoRALinear(base, rank=4, chunks=3, adapt=(0, 2))
    _randomize_B(m)
    x = torch.randn(4, 8)
    y = m(x)
    m.merge()
    assert m.merged
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-6)  # folded into the frozen weight
    m.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-6)


def _loop_reference(m: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Per-group loop: group g's rows through W0 + shared + adapter g."""
    g = m.num_groups
    outs = []
    for i, xi in enumerate(x.chunk(g)):
        with route_to_group(m, i):
            outs.append(m(xi))
    return torch.cat(outs)


@pytest.mark.parametrize("soft", [False, True])
def test_grouped_batched_equals_loop(soft):
    m = LoRALinear(_qkv(), rank=4, chunks=3, adapt=(0, 2), num_groups=2, soft=soft,
                   num_adapters=3 if soft else None)
    _randomize_B(m)
    if soft:
        with torch.no_grad():
            for a in m.tesla_alpha:
                a.normal_()
    x = torch.randn(2 * 3, 5, 8)  # task-major: rows 0-2 task 0, rows 3-5 task 1
    torch.testing.assert_close(m(x), _loop_reference(m, x), rtol=1e-5, atol=1e-6)
    # explicit formula for group 1 (one-hot): W0 + shared + B_1 A_1
    if not soft:
        x1 = x[3:]
        base = m.base(x1).view(3, 5, 3, 8)
        for j, c in enumerate((0, 2)):
            base[..., c, :] += x1 @ (m.lora_B[j] @ m.lora_A[j]).T + x1 @ (m.tesla_B[1][j] @ m.tesla_A[1][j]).T
        torch.testing.assert_close(m(x)[3:], base.view(3, 5, 24), rtol=1e-5, atol=1e-6)


def test_grouped_gradient_separation():
    m = LoRALinear(_qkv(), rank=4, chunks=3, adapt=(0, 2), num_groups=2)
    _randomize_B(m)
    x = torch.randn(4, 8)
    m(x)[2:].pow(2).sum().backward()  # group 1's loss only
    assert m.tesla_A[0].grad is None or torch.count_nonzero(m.tesla_A[0].grad) == 0
    assert m.tesla_B[0].grad is None or torch.count_nonzero(m.tesla_B[0].grad) == 0
    assert torch.count_nonzero(m.tesla_A[1].grad) > 0 and torch.count_nonzero(m.tesla_B[1].grad) > 0
    assert torch.count_nonzero(m.lora_A.grad) > 0  # shared LoRA gets both


def test_group_adapters_zero_init_equal_shared_only():
    torch.manual_seed(1)
    base = _qkv()
    m = LoRALinear(base, rank=4, chunks=3, adapt=(0, 2), num_groups=2)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(6, 8)
    shared = base(x).view(6, 3, 8)
    for j, c in enumerate((0, 2)):
        shared[:, c] += x @ (m.lora_B[j] @ m.lora_A[j]).T
    torch.testing.assert_close(m(x), shared.view(6, 24), rtol=1e-5, atol=1e-6)


def test_batch_not_multiple_of_groups():
    m = LoRALinear(_qkv(), rank=4, chunks=3, adapt=(0, 2), num_groups=2)
    with pytest.raises(ValueError, match="num_groups"):
        m(torch.randn(3, 8))


def test_plain_linear_all_rows_and_bad_args():
    lin = nn.Linear(8, 16)
    m = LoRALinear(lin, rank=2)
    _randomize_B(m)
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), lin(x) + x @ (m.lora_B[0] @ m.lora_A[0]).T)
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(8, 10), chunks=3)
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv2d(3, 3, 1))


def test_conv1x1_adapter_matches_linear():
    conv = nn.Conv2d(6, 10, 1)
    m = LoRAConv1x1(conv, rank=0, num_groups=2, group_rank=3)
    _randomize_B(m)
    x = torch.randn(4, 6, 5, 5)
    y = m(x)
    ref = conv(x)
    for g in range(2):
        xg = x[2 * g:2 * g + 2].permute(0, 2, 3, 1)
        d = xg @ (m.tesla_B[g][0] @ m.tesla_A[g][0]).T
        torch.testing.assert_close(y[2 * g:2 * g + 2], ref[2 * g:2 * g + 2] + d.permute(0, 3, 1, 2),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError):
        LoRAConv1x1(nn.Conv2d(6, 10, 3))
