"""Whole models at tiny sizes: every tiny backbone x architecture x SMA x registered task set builds and trains the
intended parameters only (the grid iterates the registries, as timm's tests iterate ``list_models``)."""
import itertools

import pytest
import torch

from endoarss_lib.models import ARCHITECTURES, BACKBONES, ModelConfig, build_model, count_gflops
from endoarss_lib.tasks import DEFAULT_TASKS, TASKS, get_task

VIT, RES = "vit_tiny_patch14", "resnet_tiny"
SIZE, K, S = 42, 3, 4
TINY_BACKBONES = [name for name in BACKBONES if "tiny" in name]  # test-size backbones (no weights to load)
MULTI_TASK_ARCHS = [arch for arch in ARCHITECTURES if arch != "single"]
TASK_SETS = list(dict.fromkeys([DEFAULT_TASKS, tuple(TASKS)]))  # the paper's pair, and every registered task


def task_classes(tasks, n=K):
    """Class counts of the tasks without a ModelConfig field of their own."""
    return {t: n for t in tasks if get_task(t).classes_field not in ModelConfig.__dataclass_fields__}


def tiny(backbone=VIT, arch="hps", sma=False, **kw):
    kw.setdefault("head_channels", 16)
    kw.setdefault("sma_dim", 8)
    kw.setdefault("num_activities", K)
    kw.setdefault("num_seg_classes", S)
    kw.setdefault("image_size", SIZE)
    kw.setdefault("task_classes", task_classes(kw.get("tasks", DEFAULT_TASKS)))
    torch.manual_seed(kw.pop("seed", 0))
    return build_model(backbone, arch, sma=sma, **kw)


def perturb_zero_init(model, scale=0.05):
    """Give zero-initialised trainable tensors (LoRA B, adapters B, ResNet last BN, residual SMA fusion) values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def batch(model, b=2, seed=0):
    """Random images and each task's random target (the registry's ``example_target``)."""
    torch.manual_seed(seed)
    x = torch.randn(b, 3, SIZE, SIZE)
    return x, {get_task(t).target: get_task(t).example_target(model.config.classes_of(t), b, SIZE, "cpu")
               for t in model.tasks}


def total_loss(model, out, targets):
    return sum(get_task(t).loss(out[t], targets) for t in model.tasks)


def expected_trainable(name, backbone, sma_trainable=True):
    if name.startswith(("heads.", "gates.")):
        return True
    if name.startswith("backbone.sma."):
        return sma_trainable
    if BACKBONES[backbone].family == "resnet":
        return True
    return name.endswith((".lora_A", ".lora_B")) or ".tesla_" in name or ".expert_" in name


GRID = list(itertools.product(TINY_BACKBONES, MULTI_TASK_ARCHS, [False, True], TASK_SETS))


@pytest.mark.parametrize("backbone,arch,sma,tasks", GRID,
                         ids=["-".join(map(str, g[:3])) + "-" + "+".join(g[3]) for g in GRID])
def test_grid_forward_backward_trainable_set(backbone, arch, sma, tasks):
    model = tiny(backbone, arch, sma, tasks=tasks)
    assert model.arch == arch and model.config.backbone == backbone and model.tasks == tasks
    names = {n for n, _ in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if expected_trainable(n, backbone)}
    if sma:
        assert any(n.startswith("backbone.sma.") for n in trainable)
    perturb_zero_init(model)
    model.train()
    x, targets = batch(model)
    out = model(x)
    assert set(out) == set(tasks)
    for t in tasks:  # logits: the batch, the task's classes, and what its decoding turns into a target's shape
        task = get_task(t)
        assert out[t].shape[:2] == (2, model.config.classes_of(t)), t
        assert task.decode(out[t]).shape == targets[task.target].shape, t
    assert all(torch.isfinite(v).all() for v in out.values())
    if arch == "tesla":
        assert model.backbone.num_groups == len(tasks)  # one adapter group per task
    loss = total_loss(model, out, targets) + model.regularization_loss()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert torch.count_nonzero(p.grad) > 0, f"no gradient reaches {n}"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    feats = model.features(x)
    assert set(feats) == set(tasks) and all(f.ndim == 4 and f.shape[0] == 2 for f in feats.values())


SINGLE = list(itertools.product(TINY_BACKBONES, TASKS))


@pytest.mark.parametrize("backbone,task", SINGLE, ids=["-".join(g) for g in SINGLE])
def test_single_task_models(backbone, task):
    for arch in ("single", "hps"):
        model = tiny(backbone, arch, tasks=(task,))
        assert set(model.heads) == {task}
        x, targets = batch(model)
        out = model(x)
        assert set(out) == {task}
        total_loss(model, out, targets).backward()


def test_frozen_dinov2_and_parameter_report():
    model = tiny(VIT, "tesla", sma=True)
    rep = model.parameter_report()
    assert set(rep) == {"backbone", "sma", "lora", "tesla", "head.cls", "head.seg", "total"}
    assert rep["backbone"]["trainable"] == 0 and rep["backbone"]["total"] > 0
    for k in ("sma", "lora", "tesla", "head.cls", "head.seg"):
        assert rep[k]["trainable"] == rep[k]["total"] > 0, k
    assert rep["total"]["total"] == sum(p.numel() for p in model.parameters())
    assert rep["total"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # lora: 3 blocks x (q + v) x (A: 4x64 + B: 64x4)
    assert rep["lora"]["total"] == 3 * 2 * (4 * 64 + 64 * 4)
    assert rep["tesla"]["total"] == 2 * rep["lora"]["total"]
    res = tiny(RES, "mmoe").parameter_report()
    assert res["experts"]["trainable"] == res["experts"]["total"] > 0 and "gates" in res


def test_gflops_by_component():
    model = tiny(VIT, "hps", sma=True)
    g = count_gflops(model, by_component=True)
    assert g["total"] > 0 and g["sma"] > 0 and g["backbone"] > 0
    parts = g["sma"] + g["backbone"] + g["gates"] + g["head.cls"] + g["head.seg"]
    assert abs(parts - g["total"]) < 1e-9
    assert count_gflops(model) == pytest.approx(g["total"])
    assert model.training  # mode restored


def test_shared_and_task_specific_parameter_sets():
    for backbone, arch in [(VIT, "tesla"), (VIT, "mmoe"), (RES, "tesla"), (VIT, "hps")]:
        model = tiny(backbone, arch)
        shared = {n for n, _ in model.named_trainable_shared_parameters()}
        cls = {n for n, _ in model.named_task_specific_parameters("cls")}
        seg = {n for n, _ in model.named_task_specific_parameters("seg")}
        allt = {n for n, p in model.named_parameters() if p.requires_grad}
        assert shared | cls | seg == allt and not (shared & cls) and not (shared & seg) and not (cls & seg)
        assert all(n.startswith(("heads.", "gates.")) or ".tesla_" in n for n in cls | seg)
        assert not any(n.startswith("heads.") for n in shared)
        if arch == "tesla":
            assert any(n.endswith("tesla_A.0") for n in cls) and any(n.endswith("tesla_A.1") for n in seg)
        assert len(model.trainable_shared_parameters()) == len(shared)
        if BACKBONES[backbone].family == "vit":
            assert not any(".vit." in n and "lora" not in n and "expert" not in n for n in shared)


def test_validation_errors():
    with pytest.raises(ValueError, match="dinov2_vitb14"):
        build_model("vit_giant", "hps", num_activities=3, num_seg_classes=3)
    with pytest.raises(ValueError, match="tesla"):
        build_model(VIT, "mola", num_activities=3, num_seg_classes=3, image_size=SIZE)
    with pytest.raises(ValueError, match=r"must be distinct names from \('cls', 'seg'"):
        build_model(VIT, "hps", tasks=("depth",), num_activities=3, num_seg_classes=3, image_size=SIZE)
    with pytest.raises(ValueError, match="num_activities"):
        build_model(VIT, "hps", num_activities=1, num_seg_classes=3, image_size=SIZE)
    with pytest.raises(ValueError, match="num_seg_classes"):
        build_model(VIT, "hps", num_activities=3, image_size=SIZE)
    build_model(VIT, "hps", tasks=("cls",), num_activities=3, image_size=SIZE, head_channels=8)  # seg not needed
    with pytest.raises(ValueError, match="image_size"):
        build_model(VIT, "hps", num_activities=3, num_seg_classes=3, image_size=50)
    with pytest.raises(ValueError, match="sma_patch_size"):
        build_model(VIT, "hps", sma=True, num_activities=3, num_seg_classes=3, image_size=42, sma_patch_size=4)
    with pytest.raises(TypeError, match="lora_rnak"):
        build_model(VIT, "hps", num_activities=3, num_seg_classes=3, image_size=SIZE, lora_rnak=8)
    with pytest.raises(ValueError, match="single"):
        build_model(VIT, "single", num_activities=3, num_seg_classes=3, image_size=SIZE)
    with pytest.raises(ValueError, match="LoRA target"):
        build_model(VIT, "hps", num_activities=3, num_seg_classes=3, image_size=SIZE, lora_targets=("attn.q",))
    with pytest.raises(ValueError, match="class token"):
        build_model(RES, "hps", num_activities=3, num_seg_classes=3, image_size=SIZE, cls_use_token=True)
    assert set(ARCHITECTURES) >= {"hps", "tesla", "mmoe", "dselect_k"}
    cfg = ModelConfig(backbone=VIT, num_activities=3, num_seg_classes=3, image_size=SIZE)
    assert cfg.to_dict()["lora_rank"] == 4 and cfg.lora_qkv == ("q", "v")


def test_random_init_recorded():
    model = tiny(VIT, "hps")
    assert model.pretrained_random_init and model.weights["source"] == "random init"
    assert model.config.pretrained is False


@pytest.mark.parametrize("name,lo,hi", [("dinov2_vits14", 21.0e6, 22.5e6), ("dinov2_vitb14", 85.0e6, 87.0e6)])
def test_paper_backbone_models_build_and_run(name, lo, hi):
    from endoarss_lib.models import RandomInitWarning

    with pytest.warns(RandomInitWarning, match="DINOv2"):
        model = build_model(name, "tesla", sma=True, sma_dim=8, num_activities=K, num_seg_classes=S, image_size=56,
                            head_channels=8)
    rep = model.parameter_report()
    assert lo < rep["backbone"]["total"] < hi and rep["backbone"]["trainable"] == 0
    assert model.pretrained_random_init
    if name == "dinov2_vits14":  # one forward at 56 px (4x4 tokens)
        out = model(torch.randn(1, 3, 56, 56))
        assert out["seg"].shape == (1, S, 56, 56) and out["cls"].shape == (1, K)
        assert model.features(torch.randn(1, 3, 56, 56))["cls"].shape == (1, 384, 4, 4)


def test_parameter_sentence_states_the_shares():
    from endoarss_lib.models.report import parameter_sentence

    report = {"backbone": {"total": 900, "trainable": 0}, "lora": {"total": 60, "trainable": 60},
              "heads": {"total": 40, "trainable": 40}, "total": {"total": 1000, "trainable": 100}}
    text = parameter_sentence(report)
    assert "100 of 1,000 parameters train (10.0%)" in text and "900 are frozen (90.0%)" in text
    assert "largest trainable part is lora (60.0%" in text
