"""LoRA in the model (zero-B == frozen backbone, merge), SMA integration, MMoE / DSelect-k gates and regulariser."""
import pytest
import timm
import torch
import torch.nn.functional as F

from endoarss_lib.models import DSelectKGate, build_model
from endoarss_lib.models.gates import smooth_step

VIT, RES = "vit_tiny_patch14", "resnet_tiny"
SIZE, K, S = 42, 3, 4


def tiny(backbone=VIT, arch="hps", **kw):
    kw.setdefault("head_channels", 16)
    kw.setdefault("sma_dim", 8)
    torch.manual_seed(kw.pop("seed", 0))
    return build_model(backbone, arch, num_activities=K, num_seg_classes=S, image_size=SIZE, **kw)


def x_(b=2, seed=0):
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def randomize(model, pattern, scale=0.1):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if pattern in n:
                p.normal_(0, scale)


# -- LoRA ----------------------------------------------------------------------------------------------------------
def test_zero_B_lora_model_equals_frozen_backbone():
    model = tiny().eval()
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, embed_dim=64, depth=3, num_heads=2,
                            img_size=SIZE, num_classes=0).eval()
    sd = {k.replace(".base.", "."): v for k, v in model.backbone.vit.state_dict().items() if "lora_" not in k}
    ref.load_state_dict(sd, strict=True)
    x = x_()
    with torch.no_grad():
        tok = ref.forward_features(x)
        fmap = model.features(x)["seg"]
    torch.testing.assert_close(fmap, tok[:, 1:].transpose(1, 2).reshape(2, 64, 3, 3), rtol=0, atol=0)


def test_lora_on_q_and_v_of_every_block():
    model = tiny()
    names = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(f"vit.blocks.{i}.attn.qkv.lora_{m}" for i in range(3) for m in "AB")
    qkv = model.backbone.vit.blocks[0].attn.qkv
    assert qkv.adapt == (0, 2) and qkv.rank == 4 and qkv.scale == 1.0


@pytest.mark.parametrize("arch", ["hps", "tesla"])
def test_merged_weights_give_same_outputs(arch):
    model = tiny(arch=arch).eval()
    randomize(model, "_B")
    w0 = model.backbone.vit.blocks[1].attn.qkv.base.weight.detach().clone()
    x = x_()
    with torch.no_grad():
        ref = model(x)
        model.merge_lora()
        assert not torch.equal(model.backbone.vit.blocks[1].attn.qkv.base.weight, w0)
        merged = model(x)
        model.unmerge_lora()
        back = model(x)
    for t in ref:
        torch.testing.assert_close(merged[t], ref[t], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(back[t], ref[t], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.backbone.vit.blocks[1].attn.qkv.base.weight, w0, rtol=0, atol=1e-6)


# -- SMA -----------------------------------------------------------------------------------------------------------
def test_sma_module_before_patch_embedding():
    model = tiny(sma=True, sma_dim=8, sma_groups=1)
    sma = model.backbone.sma
    assert type(sma).__name__ == "SMA" and sma.dim == 8 and sma.patch_size == 7
    x = x_()
    assert sma(x).shape == x.shape
    calls = []
    h = model.backbone.vit.patch_embed.register_forward_pre_hook(lambda m, a: calls.append(a[0]))
    model.eval()
    with torch.no_grad():
        model(x)
        expected = sma(x)
    h.remove()
    torch.testing.assert_close(calls[0], expected)  # the patch embedding sees SMA's output


def test_sma_residual_is_identity_at_start():
    model = tiny(sma=True, sma_residual=True).eval()
    x = x_()
    with torch.no_grad():
        assert torch.equal(model.backbone.sma(x), x)
        with_sma = model.features(x)["seg"]
        sma, model.backbone.sma = model.backbone.sma, None
        without = model.features(x)["seg"]
        model.backbone.sma = sma
    torch.testing.assert_close(with_sma, without, rtol=0, atol=0)
    # it still trains: the zero fusion gets a gradient
    model.train()
    out = model(x)
    (out["seg"].mean() + out["cls"].mean()).backward()
    assert torch.count_nonzero(model.backbone.sma.fusion.weight.grad) > 0


@pytest.mark.parametrize("backbone", [VIT, RES])
def test_sma_trainable_switch(backbone):
    x = x_()
    on = tiny(backbone, sma=True)
    off = tiny(backbone, sma=True, sma_trainable=False)
    for model, trains in ((on, True), (off, False)):
        out = model(x)
        (out["seg"].mean() + out["cls"].mean()).backward()
        for n, p in model.backbone.sma.named_parameters():
            assert p.requires_grad is trains
            assert (p.grad is not None and torch.count_nonzero(p.grad) > 0) if trains else p.grad is None, n
    assert off.parameter_report()["sma"]["trainable"] == 0 < off.parameter_report()["sma"]["total"]


def test_sma_checkpoint_same_gradients():
    x = x_()
    grads = []
    for ckpt in (False, True):
        model = tiny(sma=True, sma_checkpoint=ckpt, seed=5, seg_dropout=0.0)
        out = model(x)
        (out["seg"].square().mean() + out["cls"].square().mean()).backward()
        grads.append(model.backbone.sma.proj_in.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# -- MMoE / DSelect-k ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mmoe", "dselect_k"])
def test_moe_features_are_gate_mixtures_of_experts(arch):
    model = tiny(arch=arch, num_experts=3).eval()
    randomize(model, "expert_B")
    x = x_()
    with torch.no_grad():
        experts = model.backbone(x).maps  # (E, B, C, h, w)
        feats = model.features(x)
    assert experts.shape[0] == 3
    assert not torch.allclose(experts[0], experts[1])
    for t in ("cls", "seg"):
        w = model.last_gate_weights[t]
        assert w.shape == (2, 3) and torch.allclose(w.sum(1), torch.ones(2))
        torch.testing.assert_close(feats[t], torch.einsum("be,ebchw->bchw", w, experts), rtol=1e-5, atol=1e-6)
    # experts are LoRA sets over one frozen ViT, not copies of it
    hps = tiny()
    assert model.parameter_report()["backbone"]["total"] == hps.parameter_report()["backbone"]["total"]
    assert model.parameter_report()["experts"]["total"] == 3 * hps.parameter_report()["lora"]["total"]


def test_moe_gate_input_is_compact():
    model = tiny(arch="mmoe", gate_pool=4)
    assert model.gates["cls"].linear.in_features == 3 * 4 * 4


def test_dselect_k_regulariser_reaches_selector_logits():
    model = tiny(arch="dselect_k", num_experts=4, dselect_k=2, dselect_entropy_weight=0.1)
    assert model.regularization_loss().item() == 0.0  # nothing before a forward
    model(x_())
    reg = model.regularization_loss()
    assert reg.requires_grad and reg.item() > 0
    reg.backward()
    for t in ("cls", "seg"):
        g = model.gates[t].z_logits.weight.grad
        assert g is not None and torch.count_nonzero(g) > 0
    for m in ("hps", "mmoe", "tesla"):
        assert tiny(arch=m).regularization_loss().item() == 0.0


def test_dselect_gate_math():
    assert torch.equal(smooth_step(torch.tensor([-1.0, 0.0, 1.0])), torch.tensor([0.0, 0.5, 1.0]))
    gate = DSelectKGate(5, num_experts=3, k=2)
    with torch.no_grad():
        gate.z_logits.weight.zero_()
        gate.z_logits.bias.fill_(5.0)  # every bit 1 -> code 11, unused for E=3: uniform, not NaN
    w, sel = gate(torch.randn(4, 5))
    assert torch.allclose(w.sum(1), torch.ones(4)) and sel.shape == (4, 2, 3)
    assert torch.allclose(w, torch.full((4, 3), 1 / 3))
    with torch.no_grad():
        gate.z_logits.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))  # smooth region: proper renormalisation
    w, sel = gate(torch.randn(4, 5))
    assert torch.allclose(sel.sum(-1), torch.ones(4, 2)) and torch.allclose(w.sum(1), torch.ones(4))
    gate2 = DSelectKGate(5, num_experts=4, k=1)
    with torch.no_grad():
        gate2.z_logits.weight.zero_()
        gate2.z_logits.bias.copy_(torch.tensor([5.0, -5.0]))  # bits (1, 0) -> expert 2
    w2, sel2 = gate2(torch.randn(3, 5))
    assert torch.equal(w2, F.one_hot(torch.full((3,), 2), 4).float())
    assert DSelectKGate.entropy(sel2).item() < 1e-4


def test_resnet_moe_uses_expert_copies():
    model = tiny(RES, "mmoe", num_experts=2)
    assert len(model.backbone.experts) == 2
    a, b = (dict(e.named_parameters())["conv1.weight"] for e in model.backbone.experts)
    assert not torch.equal(a, b)  # random init: independent experts
