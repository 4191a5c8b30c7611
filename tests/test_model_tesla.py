"""TESLA (paper Eq. 5-6): gradient separation, batched pass == per-task loop, zero adapters == LoRA-only model."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from endoarss_lib.models import LoRALinear, build_model

VIT, RES = "vit_tiny_patch14", "resnet_tiny"
SIZE, K, S = 42, 3, 4
TASKS = ("cls", "seg")


def tiny(backbone=VIT, arch="tesla", **kw):
    kw.setdefault("head_channels", 16)
    torch.manual_seed(kw.pop("seed", 0))
    return build_model(backbone, arch, num_activities=K, num_seg_classes=S, image_size=SIZE, **kw)


def perturb(model, pattern="_B", scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and (pattern in n or torch.count_nonzero(p) == 0):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def data(b=3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, 3, SIZE, SIZE, generator=g), torch.randint(0, K, (b,), generator=g),
            torch.randint(0, S, (b, SIZE, SIZE), generator=g))


def loss_of(out, task, yc, ys):
    return F.cross_entropy(out["cls"], yc) if task == "cls" else F.cross_entropy(out["seg"], ys)


_IDX = re.compile(r"\.tesla_[AB]\.(\d+)$")


@pytest.mark.parametrize("backbone,last_k", [(VIT, None), (VIT, 1), (RES, None), (RES, 2)])
def test_task_loss_reaches_only_its_adapter(backbone, last_k):
    model = tiny(backbone, tesla_last_k=last_k, seg_dropout=0.0)
    perturb(model)
    x, yc, ys = data()
    adapters = [(n, p, int(_IDX.search(n).group(1))) for n, p in model.named_parameters() if _IDX.search(n)]
    assert adapters
    for t, task in enumerate(TASKS):
        model.zero_grad(set_to_none=True)
        loss_of(model(x), task, yc, ys).backward()
        for n, p, u in adapters:
            if u == t:
                assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n
            else:
                assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"task {task} leaked into {n}"
        other = TASKS[1 - t]
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.heads[other].parameters())
        shared = [p for p in model.trainable_shared_parameters()]
        assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in shared)


def test_last_k_places_adapters_in_last_blocks_only():
    model = tiny(VIT, tesla_last_k=1)
    blocks = {int(re.search(r"blocks\.(\d+)\.", n).group(1)) for n, _ in model.named_parameters() if ".tesla_" in n}
    assert blocks == {2} and model.backbone.expand_at == 2


@pytest.mark.parametrize("backbone,kw", [(VIT, {}), (VIT, {"tesla_last_k": 2}), (VIT, {"tesla_alpha": "soft"}),
                                         (VIT, {"out_layers": (0, -1), "tesla_last_k": 1}), (RES, {}),
                                         (RES, {"tesla_last_k": 1}), (VIT, {"sma": True, "sma_dim": 8}),
                                         (VIT, {"tesla_targets": ("mlp.fc1", "attn.qkv")})])
@pytest.mark.parametrize("train", [False, True])
def test_batched_pass_equals_per_task_loop(backbone, kw, train):
    model = tiny(backbone, seg_dropout=0.0, **kw)
    perturb(model)
    if kw.get("tesla_alpha") == "soft":
        perturb(model, pattern="tesla_alpha", scale=1.0, seed=2)
    model.train(train)
    x, _, _ = data()
    batched = model(x)
    loop = model.forward_per_task(x)
    for t in TASKS:
        torch.testing.assert_close(batched[t], loop[t], rtol=1e-5, atol=1e-5)


def _fold_task_into_plain_vit(model, t):
    """An independent reference: a plain timm ViT whose q/v weights hold W0 + B A + B_t A_t of task t."""
    vit = copy.deepcopy(model.backbone.vit)
    for blk in vit.blocks:
        m = blk.attn.qkv
        assert isinstance(m, LoRALinear)
        lin = nn.Linear(m.in_features, m.out_features)
        with torch.no_grad():
            w = m.base.weight.clone().view(m.chunks, m.chunk_size, -1)
            for j, c in enumerate(m.adapt):
                w[c] += m.scale * m.lora_B[j] @ m.lora_A[j]
                if m.num_groups:
                    w[c] += m.group_scale * m.tesla_B[t][j] @ m.tesla_A[t][j]
            lin.weight.copy_(w.view(m.out_features, -1))
            lin.bias.copy_(m.base.bias)
        blk.attn.qkv = lin
    return vit


def test_batched_equals_folded_weights_reference():
    model = tiny(VIT, tesla_last_k=2).eval()
    perturb(model)
    x, _, _ = data()
    with torch.no_grad():
        feats = model.features(x)
        for t, task in enumerate(TASKS):
            tok = _fold_task_into_plain_vit(model, t).forward_features(x)  # (B, 1 + 9, C)
            ref = tok[:, 1:].transpose(1, 2).reshape(3, 64, 3, 3)
            torch.testing.assert_close(feats[task], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", [VIT, RES])
def test_zero_task_adapters_equal_lora_only_model(backbone):
    tesla = tiny(backbone, seed=3, seg_dropout=0.0)
    with torch.no_grad():  # shared LoRA non-zero, task adapters at their zero init
        for n, p in tesla.named_parameters():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.1)
    assert all(torch.count_nonzero(p) == 0 for n, p in tesla.named_parameters() if ".tesla_B" in n)
    hps = tiny(backbone, "hps", seed=4, seg_dropout=0.0)
    sd = tesla.state_dict()
    if backbone == RES:  # the ResNet LoRA-only model has plain convs where TESLA wraps them (".base")
        sd = {k.replace(".base.", "."): v for k, v in sd.items()}
    res = hps.load_state_dict(sd, strict=False)
    assert not res.missing_keys, res.missing_keys
    # the task adapters, and on the ResNet the per-task BatchNorm statistics (copies of the shared ones at init)
    assert all(".tesla_" in k or ".group_running_" in k for k in res.unexpected_keys), res.unexpected_keys
    for train in (False, True):
        tesla.train(train), hps.train(train)
        x, _, _ = data()
        a, b = tesla(x), hps(x)
        for t in TASKS:
            torch.testing.assert_close(a[t], b[t], rtol=1e-5, atol=1e-5)


def test_soft_alpha_mixes_all_adapters_and_owns_alpha_rows():
    model = tiny(VIT, tesla_alpha="soft", tesla_num_adapters=3)
    assert len(model.backbone.vit.blocks[0].attn.qkv.tesla_A) == 3
    cls_own = {n for n, _ in model.named_task_specific_parameters("cls")}
    assert any(n.endswith("tesla_alpha.0") for n in cls_own)
    assert not any(".tesla_A" in n or ".tesla_B" in n for n in cls_own)  # adapters are shared in soft mode
    perturb(model)
    x, yc, ys = data()
    loss_of(model(x), "cls", yc, ys).backward()
    m = model.backbone.vit.blocks[0].attn.qkv
    assert all(torch.count_nonzero(b.grad) > 0 for b in m.tesla_B)
    assert torch.count_nonzero(m.tesla_alpha[0].grad) > 0
    assert m.tesla_alpha[1].grad is None or torch.count_nonzero(m.tesla_alpha[1].grad) == 0


def test_released_style_targets():
    model = tiny(VIT, "tesla", lora_targets=("mlp.fc1", "mlp.fc2"))
    names = [n for n, p in model.named_parameters() if p.requires_grad and "backbone" in n]
    assert names and all(".mlp.fc1." in n or ".mlp.fc2." in n for n in names)
    x, _, _ = data()
    assert model(x)["seg"].shape == (3, S, SIZE, SIZE)
