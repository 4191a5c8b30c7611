"""Backbones: configs, feature maps, strict weight loading (official DINOv2 naming, .pth and .safetensors)."""
import copy
import time
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from endoarss_lib.models import BACKBONES, RandomInitWarning, WeightsError, build_backbone, build_model
from endoarss_lib.models.backbones import create_timm_backbone

TINY = "vit_tiny_patch14"


def _official_dinov2_state_dict(vit) -> dict:
    """A timm DINOv2-style ViT's weights in the official facebookresearch/dinov2 key naming."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, vit.embed_dim)  # official checkpoints carry it; timm drops it
    expected = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                "blocks.0.attn.proj.weight", "blocks.0.ls1.gamma", "blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight",
                "blocks.0.mlp.fc2.bias", "blocks.0.ls2.gamma", "norm.weight", "norm.bias"}
    assert expected <= set(sd), expected - set(sd)
    return sd


@pytest.fixture(scope="module")
def source_vit():
    """A random tiny DINOv2-style ViT at a different grid (70 px = 5x5) than the model under test (42 px = 3x3)."""
    torch.manual_seed(0)
    vit, _ = create_timm_backbone(TINY, image_size=70)
    with torch.no_grad():  # non-trivial layer scale so every weight matters
        for n, p in vit.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.5, 1.0)
    return vit.eval()


@pytest.fixture(scope="module")
def checkpoint_files(source_vit, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    sd = _official_dinov2_state_dict(source_vit)
    torch.save(sd, d / "dinov2_tiny.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "dinov2_tiny.safetensors"))
    return d, sd


def _tokens(vit, x):
    return vit.forward_features(x)


@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_load_official_checkpoint_matches_source(source_vit, checkpoint_files, ext):
    d, _ = checkpoint_files
    path = d / f"dinov2_tiny.{ext}"
    # same grid: bit-identical tokens
    bb70 = build_backbone(TINY, image_size=70, pretrained=str(path)).eval()
    x70 = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        torch.testing.assert_close(_tokens(bb70.vit, x70), _tokens(source_vit, x70), rtol=0, atol=0)
    assert bb70.weights["source"].endswith(f"dinov2_tiny.{ext}") and len(bb70.weights["sha256"]) == 64
    assert bb70.pretrained_random_init is False
    # other grid: timm's conversion resamples pos_embed exactly as the source resamples it on the fly
    bb42 = build_backbone(TINY, image_size=42, pretrained=path).eval()
    x42 = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(_tokens(bb42.vit, x42), _tokens(source_vit, x42), rtol=1e-5, atol=1e-5)


def test_feature_map_is_spatial_patch_grid(source_vit, checkpoint_files):
    d, _ = checkpoint_files
    bb = build_backbone(TINY, image_size=70, pretrained=d / "dinov2_tiny.pth").eval()
    x = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        out = bb(x)
        tok = source_vit.forward_features(x)
    assert out.maps.shape == (1, 2, 64, 5, 5) and out.tokens.shape == (1, 2, 64)
    # map[:, :, i, j] is the patch token at row i, column j (row-major), not a reshuffle of tokens into channels
    torch.testing.assert_close(out.maps[0, :, :, 1, 3], tok[:, 1 + 1 * 5 + 3])
    torch.testing.assert_close(out.tokens[0], tok[:, 0])


def test_renamed_key_fails_naming_it(checkpoint_files, tmp_path):
    _, sd = checkpoint_files
    sd = dict(sd)
    sd["blocks.1.attn.qkv_renamed.weight"] = sd.pop("blocks.1.attn.qkv.weight")
    p = tmp_path / "renamed.pth"
    torch.save(sd, p)
    with pytest.raises(WeightsError) as e:
        build_backbone(TINY, image_size=42, pretrained=p)
    msg = str(e.value)
    assert "blocks.1.attn.qkv.weight" in msg and "missing" in msg
    assert "blocks.1.attn.qkv_renamed.weight" in msg and "unexpected" in msg
    assert str(p) in msg


def test_unexpected_key_fails_and_allow_lists(checkpoint_files, tmp_path):
    _, sd = checkpoint_files
    sd = dict(sd)
    sd["decoder.extra.weight"] = torch.zeros(3)
    p = tmp_path / "extra.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    with pytest.raises(WeightsError, match=r"decoder\.extra\.weight"):
        build_backbone(TINY, image_size=42, pretrained=p)
    build_backbone(TINY, image_size=42, pretrained=p, allow_unexpected=("decoder.*",))
    del sd["decoder.extra.weight"], sd["norm.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"norm\.bias"):
        build_backbone(TINY, image_size=42, pretrained=tmp_path / "missing.pth")
    m = build_model(TINY, "hps", num_activities=3, num_seg_classes=3, image_size=42, head_channels=8,
                    pretrained=str(tmp_path / "missing.pth"), weights_allow_missing=("norm.bias",))
    assert m.weights["source"].endswith("missing.pth")


def test_shape_mismatch_fails(checkpoint_files, tmp_path):
    _, sd = checkpoint_files
    sd = dict(sd)
    sd["blocks.0.mlp.fc1.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"blocks\.0\.mlp\.fc1\.bias"):
        build_backbone(TINY, image_size=42, pretrained=tmp_path / "shape.pth")


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        build_backbone(TINY, image_size=42, pretrained="/nonexistent/dinov2.pth")


def test_pretrained_true_offline_fails_fast_with_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is online by default (as in timm): offline is asked for
    t = time.time()
    with pytest.raises(WeightsError, match="local file") as info:
        build_backbone("dinov2_vits14", image_size=56, pretrained=True)
    assert "HF_HUB_OFFLINE" in str(info.value) and "dinov2_vits14_pretrain.pth" in str(info.value)
    assert time.time() - t < 30
    with pytest.raises(WeightsError, match="test-size"):
        build_backbone(TINY, image_size=42, pretrained=True)


@pytest.mark.parametrize("name,lo,hi", [("dinov2_vits14", 21.0e6, 22.5e6), ("dinov2_vitb14", 85.0e6, 87.0e6)])
def test_paper_backbones_build_frozen_with_loud_random_init(name, lo, hi):
    with pytest.warns(RandomInitWarning, match="mean nothing about DINOv2"):
        bb = build_backbone(name, image_size=224)
    n = sum(p.numel() for p in bb.vit.parameters())
    assert lo < n < hi, n
    assert not any(p.requires_grad for p in bb.vit.parameters())
    assert bb.pretrained_random_init and bb.weights == {"source": "random init", "sha256": None}
    assert bb.vit.patch_embed.proj.kernel_size == (14, 14) and bb.embed_dim == BACKBONES[name].embed_dim


def test_tiny_vit_same_code_path_as_dinov2():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)  # test backbones are quiet
        bb = build_backbone(TINY, image_size=42)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=42, num_classes=0)
    assert type(bb.vit) is type(ref)
    assert type(bb.vit.blocks[0].ls1) is type(ref.blocks[0].ls1)  # layer scale as DINOv2
    assert bb.vit.num_prefix_tokens == 1 and bb.vit.reg_token is None
    assert bb.pretrained_random_init


def test_any_multiple_of_14_and_bad_size():
    bb = build_backbone(TINY, image_size=42).eval()
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 56, 70)).maps.shape == (1, 1, 64, 4, 5)  # dynamic size
    with pytest.raises(ValueError, match="multiple of 14"):
        bb(torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match="image_size"):
        build_backbone(TINY, image_size=50)


@pytest.mark.parametrize("os_,side", [(16, 4), (8, 7)])
def test_resnet_dilated_trainable(os_, side):
    bb = build_backbone("resnet_tiny", image_size=56, output_stride=os_)
    out = bb(torch.randn(2, 3, 56, 56))
    assert out.maps.shape == (1, 2, 256, side, side) and out.tokens is None
    assert all(p.requires_grad for p in bb.parameters())
    # same code path as resnet101 (timm ResNet with bottlenecks)
    assert type(bb.resnet).__name__ == "ResNet" and type(bb.resnet.layer1[0]).__name__ == "Bottleneck"


def test_resnet_checkpoint_strict(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("resnet_tiny", image_size=56)
    sd = {k: v for k, v in src.resnet.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(10, 256), torch.zeros(10)  # classifier: dropped silently
    torch.save(sd, tmp_path / "r.pth")
    bb = build_backbone("resnet_tiny", image_size=56, pretrained=tmp_path / "r.pth")
    for k, v in src.resnet.state_dict().items():
        assert torch.equal(bb.resnet.state_dict()[k], v), k
    sd.pop("layer4.0.conv2.weight")
    torch.save(sd, tmp_path / "r2.pth")
    with pytest.raises(WeightsError, match=r"layer4\.0\.conv2\.weight"):
        build_backbone("resnet_tiny", image_size=56, pretrained=tmp_path / "r2.pth")


def test_unknown_backbone():
    with pytest.raises(ValueError, match="dinov2_vitb14"):
        build_backbone("vit_huge", image_size=224)


def test_deepcopy_keeps_provenance():
    bb = build_backbone(TINY, image_size=42)
    assert copy.deepcopy(bb).weights == bb.weights


def test_group_batchnorm_keeps_groups_apart():
    from endoarss_lib.models import GroupBatchNorm2d

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    gbn = GroupBatchNorm2d.from_bn(bn, groups=2).train()
    x = torch.cat([torch.randn(3, 4, 5, 5), 5 + 3 * torch.randn(3, 4, 5, 5)])  # two groups, different stats
    y = gbn(x)
    ref = [copy.deepcopy(bn).train()(xi) for xi in x.chunk(2)]
    torch.testing.assert_close(y, torch.cat(ref), rtol=1e-5, atol=1e-5)
    # running statistics: each group its own, exactly what a separate BatchNorm per task would hold
    for i, (r, xi) in enumerate(zip(ref, x.chunk(2))):
        bn_i = copy.deepcopy(bn).train()
        bn_i(xi)
        torch.testing.assert_close(gbn.group_running_mean[i], bn_i.running_mean)
        torch.testing.assert_close(gbn.group_running_var[i], bn_i.running_var)
    group_means = torch.stack([xi.mean(dim=(0, 2, 3)) for xi in x.chunk(2)]).mean(0)
    torch.testing.assert_close(gbn.running_mean, 0.1 * group_means)  # the average, as a shared BN would see
    assert gbn.num_batches_tracked.item() == 1
    gbn.eval()
    # evaluation: group t's rows are normalised with group t's running statistics (a per-task BatchNorm in eval)
    per_task = []
    for i, xi in enumerate(x.chunk(2)):
        bn_i = copy.deepcopy(bn).train()
        bn_i(xi)
        per_task.append(bn_i.eval()(xi))
    torch.testing.assert_close(gbn(x), torch.cat(per_task), rtol=1e-5, atol=1e-5)
    shared = torch.nn.functional.batch_norm(x[:3], gbn.running_mean, gbn.running_var, gbn.weight, gbn.bias, False,
                                            0.0, gbn.eps)
    assert not torch.allclose(per_task[0], shared, atol=1e-3)  # one averaged statistic would be wrong for both
    gbn.forced_group = 1  # the per-task loop (one group's batch): that group's statistics
    torch.testing.assert_close(gbn(x.chunk(2)[1]), per_task[1], rtol=1e-5, atol=1e-5)
