"""Protocol fidelity: each place where we follow the paper or reproduce the released code, checked against an
independent reference (PIL, torchvision, LibMTL's definitions, the paper's transcribed tables) rather than against
our own output."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from endoarss_lib import train
from endoarss_lib.config import preset
from endoarss_lib.metrics import SegmentationMeter, per_activity_spread, pil_nearest_resize
from endoarss_lib.models import DSelectKGate, ModelConfig, build_model
from endoarss_lib.models.heads import ASPP
from endoarss_lib.models.lora import LoRALinear
from endoarss_lib.paper import ablation_variants, load_paper_table
from endoarss_lib.weighting import STCH

ROOT = Path(__file__).resolve().parents[1]

# -- the released evaluation resizes label maps to 244 x 244 with PIL NEAREST -----------------------------------------


@pytest.mark.parametrize("shape,size", [((224, 224), 244), ((112, 112), 244), ((250, 301), 244), ((7, 13), (5, 29)),
                                        ((244, 244), 244), ((1080 // 8, 1920 // 8), 244)])
def test_pil_nearest_resize_is_pil_bit_for_bit(shape, size):
    rng = np.random.default_rng(sum(shape))
    labels = rng.integers(0, 200, size=shape, dtype=np.uint8)
    oh, ow = (size, size) if isinstance(size, int) else size
    ref = np.asarray(Image.fromarray(labels).resize((ow, oh), Image.NEAREST))
    np.testing.assert_array_equal(pil_nearest_resize(labels, size), ref)


def test_compat_miou_is_computed_on_pil_resized_maps():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, size=(2, 112, 112))
    pred = np.where(rng.random((2, 112, 112)) < 0.7, target, rng.integers(0, 3, size=(2, 112, 112)))
    meter = SegmentationMeter(3, compute_distances=False, compute_ssim=False, compat_size=244)
    meter.update(torch.from_numpy(pred), torch.from_numpy(target))
    got = meter.compute()
    # reference: PIL-resize both maps, then the released formula tp / (tp + fp + fn + 1e-3) averaged over all classes
    cm = np.zeros((3, 3), np.int64)
    for p, t in zip(pred, target):
        pr = np.asarray(Image.fromarray(p.astype(np.uint8)).resize((244, 244), Image.NEAREST)).ravel()
        tr = np.asarray(Image.fromarray(t.astype(np.uint8)).resize((244, 244), Image.NEAREST)).ravel()
        np.add.at(cm, (tr, pr), 1)
    tp = np.diag(cm).astype(float)
    ref = np.mean(tp / (cm.sum(0) + cm.sum(1) - tp + 1e-3))
    assert got["compat_miou"] == pytest.approx(ref, abs=1e-12)
    # the correct mIoU stays at the model's own resolution
    assert cm.sum() == 2 * 244 * 244 and got["num_pixels"] == 2 * 112 * 112


# -- STCH: LibMTL's warm-up convention for the released preset ------------------------------------------------------------


def _libmtl_stch_reference(history: list[list[np.ndarray]], warmup_epoch: int, mu: float):
    """LibMTL's STCH (``LibMTL/weighting/STCH.py``) over a history of per-epoch loss vectors: epochs
    ``0..warmup_epoch`` use the sum of log losses; the nadir is the mean of the losses seen during epoch
    ``warmup_epoch``; later epochs use ``mu * log(sum(exp((l - max l) / mu))) * T`` with ``l = log(L / nadir)`` and
    the max detached. Returns one value per step."""
    values, nadir = [], None
    for epoch, steps in enumerate(history):
        if epoch == warmup_epoch + 1:
            nadir = np.mean(history[warmup_epoch], axis=0)
        for losses in steps:
            if epoch <= warmup_epoch:
                values.append(float(np.log(losses + 1e-20).sum()))
            else:
                l = np.log(losses / nadir + 1e-20)
                values.append(mu * math.log(np.exp((l - l.max()) / mu).sum()) * len(losses))
    return values


def test_stch_libmtl_convention_matches_libmtl_schedule():
    mu, warmup = 0.5, 2
    rng = np.random.default_rng(7)
    history = [[rng.uniform(0.2, 2.0, size=2) for _ in range(3)] for _ in range(6)]
    ref = _libmtl_stch_reference(history, warmup, mu)
    w = STCH(mu=mu, warmup_epochs=warmup, warmup_convention="libmtl")
    got = []
    for epoch, steps in enumerate(history):
        w.set_epoch(epoch, len(history))
        for losses in steps:
            got.append(float(w.combine_losses(torch.tensor(losses, dtype=torch.float64))))
    n_log = (warmup + 1) * 3
    assert np.allclose(got[:n_log], ref[:n_log], rtol=1e-12)
    assert np.allclose(got[n_log:], ref[n_log:], rtol=1e-10)
    # the default ("spec") convention switches one epoch earlier, with the nadir of epoch warmup - 1
    spec = STCH(mu=mu, warmup_epochs=warmup)
    assert spec.log_epochs == warmup and w.log_epochs == warmup + 1


def test_released_preset_uses_libmtl_stch_and_the_paper_preset_does_not():
    released = preset("released", dataset="mtlendovis")
    assert released.weighting == "stch" and released.weighting_hparams == {"warmup_convention": "libmtl"}
    assert released.select_on == "test" and released.normalize == "unit" and released.augment is False
    assert (released.lr, released.batch_size, released.epochs) == (1.1e-3, 32, 150)
    paper = preset("paper", dataset="mtlendovis")
    assert paper.weighting == "stch" and not paper.weighting_hparams and paper.select_on == "val"
    assert preset("released", dataset="mtlesd").weighting == "db_mtl"


@pytest.mark.parametrize("dataset,lr,weighting", [("mtlesd", 1e-4, "db_mtl"), ("mtlendovis", 1e-3, "stch")])
def test_cli_paper_preset_follows_the_dataset(dataset, lr, weighting, capsys):
    """Paper Sec. IV-B: Adam, lr 1e-4 on MTLESD and 1e-3 on MTLEndovis; Tables II/III headline weighting."""
    assert train.main(["--preset", "paper", f"dataset={dataset}", "--print-config"]) == 0
    cfg = yaml.safe_load(io.StringIO(capsys.readouterr().out))
    assert cfg["lr"] == lr and cfg["weighting"] == weighting
    assert (cfg["image_size"], cfg["batch_size"], cfg["epochs"]) == (224, 16, 200)
    model = cfg["model"]
    assert model["backbone"] == "dinov2_vitb14" and model["arch"] == "tesla" and model["sma"] is True
    assert model["lora_rank"] == 4 and list(model["lora_qkv"]) == ["q", "v"]


# -- TESLA adapters use the LoRA scale alpha / r ---------------------------------------------------------------------


@pytest.mark.parametrize("rank,alpha", [(4, None), (4, 8.0), (2, 1.0)])
def test_tesla_adapter_scale_is_alpha_over_rank(rank, alpha):
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 9)
    layer = LoRALinear(base, rank=rank, alpha=alpha, chunks=3, adapt=(0, 2), num_groups=2, group_rank=rank,
                       group_alpha=alpha)
    with torch.no_grad():
        for b in layer.tesla_B:
            b.normal_()
    x = torch.randn(5, 6)
    layer.forced_group = 1
    delta = layer(x) - base(x)
    # reference: h = W0 x + (alpha / r) B_g A_g x on the adapted chunks (q and v of qkv), untouched elsewhere
    scale = (alpha if alpha is not None else rank) / rank
    a, b = layer.tesla_A[1], layer.tesla_B[1]
    ref = torch.zeros(5, 9)
    for j, chunk in enumerate((0, 2)):
        ref[:, chunk * 3:(chunk + 1) * 3] = scale * x @ a[j].T @ b[j].T
    torch.testing.assert_close(delta, ref, rtol=1e-5, atol=1e-6)


def test_model_passes_lora_alpha_to_the_tesla_adapters():
    model = build_model(backbone="vit_tiny_patch14", arch="tesla", image_size=28, lora_rank=4, lora_alpha=8.0,
                        num_activities=3, num_seg_classes=2)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.num_groups]
    assert layers and all(m.group_scale == 2.0 and m.scale == 2.0 for m in layers)


# -- DSelect-k and the DeepLab head: the reference initialisations and dropout ---------------------------------------


def test_dselect_k_selector_weights_start_like_libmtl():
    """LibMTL's DSelect_k (after the authors' TensorFlow code) draws the selector weights w from U(-0.05, 0.05)."""
    torch.manual_seed(0)
    gate = DSelectKGate(64, num_experts=8, k=2)
    for p in (gate.w_logits.weight, gate.w_logits.bias):
        assert p.abs().max() <= 0.05 and p.abs().max() > 0.04  # spread over the whole interval
    assert gate.w_logits.weight.std().item() == pytest.approx(0.1 / math.sqrt(12), rel=0.15)


def test_segmentation_dropout_matches_torchvision_deeplabv3():
    from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

    tv = TorchvisionASPP(32, [2, 4, 6], out_channels=16)
    tv_p = [m.p for m in tv.modules() if isinstance(m, torch.nn.Dropout)]
    ours = ASPP(32, channels=16)
    ours_p = [m.p for m in ours.modules() if isinstance(m, torch.nn.Dropout)]
    assert ours_p == tv_p == [0.5]
    assert ModelConfig(num_activities=3, num_seg_classes=2).seg_dropout == 0.5


# -- notebook 04 runs Table V row for row ----------------------------------------------------------------------------


def test_ablation_variants_are_table_v_rows():
    table = load_paper_table("table5")
    for dataset in table["dataset"].unique():
        rows = table[table["dataset"] == dataset].reset_index(drop=True)
        variants = list(ablation_variants(vit="vit_tiny_patch14", cnn="resnet_tiny", sma={"sma_dim": 16}).values())
        assert len(variants) == len(rows) == 6
        for options, row in zip(variants, rows.itertuples()):
            cfg = ModelConfig(**options, num_activities=3, num_seg_classes=2)
            assert cfg.paper_backbone == row.backbone
            assert cfg.arch == row.arch
            assert cfg.sma == bool(row.SMA)
            assert (cfg.arch == "tesla") == bool(row.TESLA)


def test_notebook_04_uses_the_library_variants():
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "04_ablation_components.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "ablation_variants(" in code


def test_table5_rows_are_the_papers_rows():
    """Each named variant of Table V has the row's backbone family, architecture and SMA switch."""
    from endoarss_lib.evidence.variants import FEATURED_MODEL, TABLE5_ROWS, VARIANTS
    from endoarss_lib.paper import ablation_variants

    rows = list(ablation_variants(vit="vit_mini_patch14", cnn="resnet_tiny").values())
    assert sorted(TABLE5_ROWS) == list(range(1, len(rows) + 1))
    for number, options in enumerate(rows, start=1):
        model = {**FEATURED_MODEL, **VARIANTS[TABLE5_ROWS[number]].get("model", {})}
        assert model["backbone"] == options["backbone"], number
        assert model["arch"] == options["arch"], number
        assert bool(model.get("sma")) == bool(options.get("sma")), number


# -- the paper's Table V "+-": the spread across activity classes, ignored pixels excluded ----------------------------


def test_per_activity_spread_against_direct_computation():
    from endoarss_lib.engine import _image_records

    rng = np.random.default_rng(1)
    n, ignore = 12, 255
    labels = rng.integers(0, 3, size=n)
    target = rng.integers(0, 3, size=(n, 10, 10))
    target[:, :2] = ignore
    pred = np.where(rng.random((n, 10, 10)) < 0.6, np.clip(target, 0, 2), rng.integers(0, 3, size=(n, 10, 10)))
    pred_label = np.where(rng.random(n) < 0.7, labels, (labels + 1) % 3)
    correct = pred_label == labels
    out = {"cls": torch.nn.functional.one_hot(torch.from_numpy(pred_label), 3).float(),
           "seg": torch.nn.functional.one_hot(torch.from_numpy(pred), 3).permute(0, 3, 1, 2).float()}
    batch = {"image": torch.zeros(n, 3, 10, 10), "label": torch.from_numpy(labels), "mask": torch.from_numpy(target)}
    records = _image_records(out, batch, {"cls": 3, "seg": 3}, ignore)
    got = per_activity_spread(records)
    # reference: foreground = class > 0, over valid pixels only; pooled per activity, population std
    valid = target != ignore
    fp, ft = (pred > 0) & valid, (target > 0) & valid
    pooled = []
    for k in np.unique(labels):
        sel = labels == k
        pooled.append((fp[sel] & ft[sel]).sum() / (fp[sel] | ft[sel]).sum())
    assert got["seg_fg_iou_std"] == pytest.approx(np.std(pooled), abs=1e-12)
    acc = [correct[labels == k].mean() for k in np.unique(labels)]
    assert got["cls_per_class_accuracy_std"] == pytest.approx(np.std(acc), abs=1e-12)
