"""How good frozen features are: linear probes on a synthetic preset (:func:`evaluate_backbone`), and the weight
record's metrics (:func:`record_metrics`: the pretrained weights against the same backbone left at random init)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.registry import DATASETS, SYNTHETIC_PRESETS
from ..data.synthetic import activity_counts, render_sample, sample_rng
from ..metrics import segmentation_metrics
from ..models.backbones import create_timm_backbone
from ..models.weights import RandomInitWarning
from .crops import _MEAN, _STD

__all__ = ["extract_features", "evaluate_backbone", "record_metrics"]


@torch.no_grad()
def extract_features(vit: nn.Module, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of normalised images: (class token ++ mean patch token) (N, 2C), patch maps (N, C, h, w)."""
    vit.eval()
    glob, maps = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        t = vit.forward_features(x)
        cls, patches = t[:, 0], t[:, vit.num_prefix_tokens:]
        h, w = x.shape[-2] // 14, x.shape[-1] // 14
        glob.append(torch.cat([cls, patches.mean(1)], 1))
        maps.append(patches.transpose(1, 2).reshape(len(x), -1, h, w))
    return torch.cat(glob), torch.cat(maps)


def _probe_data(preset: str, n_train: int, n_test: int, size: int, seed: int):
    spec = DATASETS[SYNTHETIC_PRESETS[preset]]
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs, masks, labels = [], [], []
        for name, count in activity_counts(preset, n).items():
            a = spec.activities.index(name)
            for k in range(count):
                img, mask = render_sample(preset, name, sample_rng(seed, preset, split, a, k), image_size=size)
                imgs.append(img)
                masks.append(mask)
                labels.append(a)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
        out[split] = ((x - _MEAN) / _STD, torch.from_numpy(np.stack(masks)).long(), torch.tensor(labels))
    return out, spec


def evaluate_backbone(weights, backbone: str = "vit_mini_patch14", preset: str = "mtlesd", n_train: int = 192,
                      n_test: int = 96, image_size: int = 112, seed: int = 0, layerscale_init: float | None = None,
                      progress: bool = False) -> dict:
    """Linear probes of frozen features on a synthetic preset (the record's metrics).

    * ``linear_probe_accuracy``: activity from (class token ++ mean patch token) by multinomial logistic regression
      (scikit-learn, standardised features), trained on ``n_train`` images, tested on ``n_test``;
    * ``patch_probe_miou_fg``: segmentation from a per-patch linear layer on the frozen patch tokens, logits upsampled
      bilinearly, pixel cross-entropy (Adam, 300 steps): foreground mIoU on the test images.

    ``weights``: a file path, or None for the randomly initialised backbone (``layerscale_init`` to choose its
    LayerScale start).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit, info = create_timm_backbone(backbone, image_size, pretrained=weights if weights is not None else False,
                                         layerscale_init=layerscale_init)
    data, spec = _probe_data(preset, n_train, n_test, image_size, seed)
    feats = {s: extract_features(vit, data[s][0]) for s in data}
    scaler = StandardScaler().fit(feats["train"][0].numpy())
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(feats["train"][0].numpy()),
                                                       data["train"][2].numpy())
    acc = float((clf.predict(scaler.transform(feats["test"][0].numpy())) == data["test"][2].numpy()).mean())
    s = spec.num_seg_classes
    mtr, mte = feats["train"][1], feats["test"][1]
    mu, sd = mtr.mean((0, 2, 3), keepdim=True), mtr.std((0, 2, 3), keepdim=True) + 1e-6
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Conv2d(mtr.shape[1], s, 1)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        ytr = data["train"][1]
        for _ in range(300):
            logits = F.interpolate(head((mtr - mu) / sd), size=ytr.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = F.interpolate(head((mte - mu) / sd), size=ytr.shape[-2:], mode="bilinear",
                             align_corners=False).argmax(1)
    seg = segmentation_metrics(pred.numpy(), data["test"][1].numpy(), s, compute_distances=False, compute_ssim=False)
    majority = float(np.bincount(data["test"][2].numpy()).max() / len(data["test"][2]))
    return {"probe_preset": f"synthetic {preset}", "probe_images": {"train": n_train, "test": n_test},
            "probe_image_size": image_size, "probe_seed": seed,
            "linear_probe_accuracy": round(acc, 4), "majority_accuracy": round(majority, 4),
            "patch_probe_miou_fg": round(float(seg["miou_fg"]), 4), "patch_probe_miou": round(float(seg["miou"]), 4),
            "weights": info["source"]}


_PROBE_KEYS = ("linear_probe_accuracy", "patch_probe_miou_fg", "patch_probe_miou")


def record_metrics(weights, backbone: str, layerscale_init: float, progress: bool = False) -> dict:
    """The weight record's metrics: :func:`evaluate_backbone` of the weights, and the same probes of the backbone
    left at its random initialisation with the LayerScale the pretraining started from, with LayerScale 1 (the fair
    random baseline: the strongest random features) and with timm's DINOv2 default (1e-5), so the record says what
    pretraining adds."""
    out = evaluate_backbone(weights, backbone, progress=progress)
    out["weights"] = Path(weights).name
    for key, ls in (("random_init", layerscale_init), ("random_init_layerscale_1", 1.0),
                    ("random_init_timm_layerscale", 1e-5)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomInitWarning)  # the point here
            base = evaluate_backbone(None, backbone, layerscale_init=ls)
        out[key] = {"layerscale_init": ls, **{k: base[k] for k in _PROBE_KEYS}}
    return out
