"""The project's own foundation model: the pretraining recipe's pieces against closed forms and SciPy, a resumable
tiny pretraining run, the bundled weight record (hash, strict loading, what its probes say), and the reason the
whole thing exists: adapters on a LayerScale-1e-5 ViT change nothing, on ours they do."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.spatial.distance import cdist

from endoarss_lib import foundation as pt
from endoarss_lib.foundation.crops import _MEAN, _STD
from endoarss_lib.foundation.losses import _koleo
from endoarss_lib.foundation.schedules import _schedules
from endoarss_lib.models import build_model
from endoarss_lib.models.lora import LoRALinear
from endoarss_lib.models.pretrained import DEFAULT_PRETRAINED, get_pretrained, list_pretrained, verified_file

# -- recipe pieces ---------------------------------------------------------------------------------------------------


def test_sinkhorn_targets_are_distributions_with_balanced_prototypes():
    torch.manual_seed(0)
    logits = torch.randn(64, 16, dtype=torch.float64) + torch.linspace(0, 2, 16, dtype=torch.float64)  # unequal use
    q = pt.sinkhorn_knopp(logits, temp=0.5, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(64, dtype=q.dtype), atol=1e-6)  # each sample: a distribution
    assert torch.allclose(q.sum(0), torch.full((16,), 64 / 16, dtype=q.dtype), rtol=1e-3)  # prototypes used N/K times
    # a softmax keeps the imbalance Sinkhorn removes
    soft = torch.softmax(logits / 0.5, 1).sum(0)
    assert soft.max() / soft.min() > 10


def test_koleo_matches_scipy_nearest_neighbour_distances():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20, 8))
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    d = cdist(zn, zn)
    np.fill_diagonal(d, np.inf)
    ref = -np.mean(np.log(d.min(1) + 1e-8))
    assert _koleo(torch.tensor(z)).item() == pytest.approx(ref, rel=1e-10)


def test_multicrop_shapes_ranges_and_determinism():
    cfg = pt.PretrainConfig(global_size=28, local_size=14, num_local=2, render_size=40, pool_size=3)
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    a = pt.MultiCrop(cfg)(images, torch.Generator().manual_seed(1))
    b = pt.MultiCrop(cfg)(images, torch.Generator().manual_seed(1))
    assert [tuple(v.shape) for v in a] == [(3, 3, 28, 28)] * 2 + [(3, 3, 14, 14)] * 2
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # ImageNet-normalised values of [0, 1] images
    lo = ((0 - _MEAN) / _STD).min().item()
    hi = ((1 - _MEAN) / _STD).max().item()
    assert all(v.min() >= lo - 1e-5 and v.max() <= hi + 1e-5 for v in a)
    # the two global crops differ (different boxes, flips, colours)
    assert not torch.equal(a[0], a[1])


def test_schedules_endpoints():
    cfg = pt.PretrainConfig()
    start, mid, end = _schedules(cfg, 0.0), _schedules(cfg, cfg.warmup), _schedules(cfg, 1.0)
    assert start["lr"] == 0 and mid["lr"] == pytest.approx(cfg.lr) and end["lr"] == pytest.approx(cfg.min_lr)
    assert start["momentum"] == pytest.approx(cfg.momentum_teacher) and end["momentum"] == pytest.approx(1.0)
    assert start["teacher_temp"] == cfg.warmup_teacher_temp and end["teacher_temp"] == cfg.teacher_temp


# -- a tiny pretraining run: files, record, strict loading, resume after an interruption -------------------------------

TINY = dict(name="tiny", backbone="vit_tiny_patch14", pool_size=6, render_size=42, global_size=28, local_size=14,
            num_local=2, out_dim=16, patch_out_dim=16, head_hidden=32, head_bottleneck=8, batch_size=4, steps=4,
            checkpoint_every=2, log_every=1, amp="off", threads=1)


def test_pretrain_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = pt.PretrainConfig(**TINY)
    full = pt.pretrain(cfg, tmp_path / "full", progress=False, evaluate=False)
    weights = tmp_path / "full" / "tiny.safetensors"
    # the record: its hash is the file's, no checkpoint left behind, no label read
    assert full["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "full" / "tiny.json").read_text())["sha256"] == full["sha256"]
    assert not (tmp_path / "full" / "tiny.ckpt.pt").exists()
    assert full["data"]["labels_used"] is False and full["training"]["steps"] == 4
    # interrupted after the step-2 checkpoint, then run again: resumes and ends on the same weights
    calls = {"n": 0}
    original = pt.SelfDistillation.update_teacher

    def dying(self, momentum):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, momentum)

    monkeypatch.setattr(pt.SelfDistillation, "update_teacher", dying)
    with pytest.raises(KeyboardInterrupt):
        pt.pretrain(cfg, tmp_path / "resumed", progress=False, evaluate=False)
    assert (tmp_path / "resumed" / "tiny.ckpt.pt").is_file()
    monkeypatch.setattr(pt.SelfDistillation, "update_teacher", original)
    pt.pretrain(cfg, tmp_path / "resumed", progress=False, evaluate=False)
    a, b = load_file(str(weights)), load_file(str(tmp_path / "resumed" / "tiny.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another recipe refuses the checkpoint of this one
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(pt.SelfDistillation, "update_teacher", dying)
        calls["n"] = 0
        pt.pretrain(cfg, tmp_path / "other", progress=False, evaluate=False)
    monkeypatch.setattr(pt.SelfDistillation, "update_teacher", original)
    with pytest.raises(ValueError, match="another pretraining config"):
        pt.pretrain(pt.PretrainConfig(**{**TINY, "lr": 1e-4}), tmp_path / "other", progress=False, evaluate=False)
    # the weights load strictly into the backbone they were trained for, tensor for tensor
    model = build_model(backbone="vit_tiny_patch14", arch="tesla", image_size=28, pretrained=str(weights),
                        num_activities=3, num_seg_classes=2)
    vit = model.backbone.vit if hasattr(model.backbone, "vit") else model.backbone
    state = {k.replace(".base.", "."): v for k, v in vit.state_dict().items()}
    for key, tensor in a.items():
        assert torch.equal(state[key], tensor), key


# -- the bundled weights -----------------------------------------------------------------------------------------------


def test_bundled_record_matches_its_file():
    assert DEFAULT_PRETRAINED in list_pretrained()
    rec = get_pretrained(DEFAULT_PRETRAINED)
    assert rec.sha256 == hashlib.sha256(rec.file.read_bytes()).hexdigest()
    assert verified_file(DEFAULT_PRETRAINED, "vit_mini_patch14") is rec
    assert rec.mean == (0.485, 0.456, 0.406) and rec.std == (0.229, 0.224, 0.225)
    raw = json.loads(rec.file.with_suffix(".json").read_text())
    assert raw["data"]["labels_used"] is False and "/" not in str(raw["metrics"].get("weights", ""))


def test_bundled_weights_beat_random_init_on_linear_probes():
    """The record's probes (activity from frozen global features; segmentation from frozen patch tokens) against the
    same backbone at random initialisation and against the majority class."""
    m = get_pretrained(DEFAULT_PRETRAINED).metrics
    assert m["linear_probe_accuracy"] > m["majority_accuracy"] + 0.2
    for baseline in ("random_init", "random_init_layerscale_1", "random_init_timm_layerscale"):
        assert m["linear_probe_accuracy"] > m[baseline]["linear_probe_accuracy"] + 0.1, baseline
    for baseline in ("random_init", "random_init_timm_layerscale"):
        assert m["patch_probe_miou_fg"] > m[baseline]["patch_probe_miou_fg"], baseline
    # per-patch LINEAR segmentation: random LayerScale-1 features (a random projection of the pixels) are as good;
    # what pretraining buys for segmentation shows after adaptation (benchmarks/bench_foundation.py)
    assert abs(m["patch_probe_miou_fg"] - m["random_init_layerscale_1"]["patch_probe_miou_fg"]) < 0.03


def test_bundled_weights_load_strictly_and_change_the_features():
    rec = get_pretrained(DEFAULT_PRETRAINED)
    file = load_file(str(rec.file))
    torch.manual_seed(0)
    loaded = build_model(backbone="vit_mini_patch14", arch="tesla", image_size=56, pretrained=DEFAULT_PRETRAINED,
                         num_activities=3, num_seg_classes=2)
    assert loaded.backbone.weights["sha256"] == rec.sha256
    assert not loaded.backbone.pretrained_random_init
    state = {k.replace(".base.", "."): v for k, v in loaded.backbone.vit.state_dict().items()}
    same = [k for k in file if k != "pos_embed"]  # the position embedding is resampled to 56 px
    assert all(torch.equal(state[k], file[k]) for k in same)


# -- why: adapters on LayerScale 1e-5 are a no-op; on LayerScale 1 and on the bundled weights they are not --------------


def _adapter_effect(model, seed: int = 0) -> tuple[float, float]:
    """Relative change of the task features when every LoRA and TESLA ``B`` is drawn from N(0, 1) (the issue's
    measurement: 1e-6 on the LayerScale-1e-5 ViT), and the relative gap between the two tasks' features then."""
    model.eval()
    size = model.config.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model.features(x)
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.backbone.named_parameters():
            if name.endswith("lora_B") or ".tesla_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen))
        after = model.features(x)
    change = min(float((after[t] - before[t]).norm() / before[t].norm()) for t in before)
    return change, float((after["cls"] - after["seg"]).norm() / after["cls"].norm())


@pytest.mark.parametrize("options,expect_effect", [
    (dict(backbone="vit_tiny_patch14", pretrained=False, layerscale_init=1e-5), False),  # timm's DINOv2 default
    (dict(backbone="vit_tiny_patch14", pretrained=False), True),  # the test ViT: LayerScale 1
    (dict(backbone="vit_mini_patch14", pretrained=DEFAULT_PRETRAINED), True),  # the bundled foundation model
])
def test_adapters_perturb_the_backbone(options, expect_effect):
    torch.manual_seed(0)
    model = build_model(arch="tesla", image_size=56, num_activities=3, num_seg_classes=2, **options)
    effect, task_gap = _adapter_effect(model)
    if expect_effect:
        assert effect >= 1e-2 and task_gap >= 1e-2, (effect, task_gap)
    else:  # behind timm's LayerScale 1e-5 the adapters are a no-op: TESLA would compare identical backbones
        assert effect < 1e-4 and task_gap < 1e-4, (effect, task_gap)


def test_a_new_version_of_the_bundled_weights_gets_new_run_folders(monkeypatch, tmp_path):
    """Results trained on an older version of the bundled weights are never reused for the new one."""
    import dataclasses

    from endoarss_lib.config import preset
    from endoarss_lib.training.engine import CheckpointMismatch, fit, run_dir
    from endoarss_lib.models import pretrained

    cfg = preset("smoke", out_dir=str(tmp_path))
    assert cfg.model.pretrained == DEFAULT_PRETRAINED
    before, folder = cfg.results_hash(), run_dir(cfg)
    rec = get_pretrained(DEFAULT_PRETRAINED)
    monkeypatch.setattr(pretrained, "_records", lambda: {rec.name: dataclasses.replace(rec, sha256="0" * 64)})
    assert cfg.results_hash() != before and run_dir(cfg) != folder
    # a named run folder written with the other version is refused, untouched
    named = cfg.replace(run_name="mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "result.json").write_text(json.dumps({"config_hash": named.results_hash()}))
    monkeypatch.undo()
    with pytest.raises(CheckpointMismatch, match="another config"):
        fit(named)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["result.json"]
