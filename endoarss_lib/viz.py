"""Pictures for notebooks: class palettes, mask overlays, sample grids and class distributions."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .atomic import atomic_path
from .data.dataset import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["class_palette", "overlay", "denormalize", "legend_handles", "show_samples", "plot_distributions",
           "save_figure", "data_label", "plot_prediction", "prediction_browser", "plot_training_curves"]


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: black background, then distinct tab20 colours."""
    colours = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]
    rgb = [(0.0, 0.0, 0.0)] + [colours[k % len(colours)] for k in range(num_classes - 1)]
    return (np.asarray(rgb) * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5,
            ignore_index: int = 255) -> np.ndarray:
    """Blend class colours into an RGB uint8 image wherever the mask is not background (or ignored)."""
    out = image.astype(np.float32).copy()
    shown = (mask > 0) & (mask != ignore_index)
    colours = palette[np.where(shown, mask, 0)].astype(np.float32)
    out[shown] = (1 - alpha) * out[shown] + alpha * colours[shown]
    return out.round().clip(0, 255).astype(np.uint8)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalised (3, H, W) tensor back to uint8 (H, W, 3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.detach().cpu().float() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def legend_handles(class_names: Sequence[str], palette: np.ndarray) -> list[Patch]:
    """Legend patches, one per class, in palette colours."""
    return [Patch(facecolor=palette[k] / 255, edgecolor="grey", label=f"{k}: {name}")
            for k, name in enumerate(class_names)]


def data_label(dataset) -> str:
    """'SYNTHETIC data' or 'real data': the tag every figure and table from a dataset carries."""
    return "SYNTHETIC data (demonstrates the pipeline; reproduces nothing of the paper)" if dataset.synthetic \
        else "real data"


def show_samples(dataset, per_activity: int = 2, max_activities: int = 6, alpha: float = 0.5) -> Figure:
    """A grid: for a few samples of each activity, the image and its mask overlay, with a class legend."""
    spec = dataset.spec
    labels = np.asarray(dataset.labels)
    activities = [a for a in range(spec.num_activities) if (labels == a).any()][:max_activities]
    palette = class_palette(spec.num_seg_classes)
    fig, axes = plt.subplots(2 * per_activity, len(activities), squeeze=False,
                             figsize=(2.2 * len(activities), 4.4 * per_activity))
    for col, activity in enumerate(activities):
        for row, index in enumerate(np.flatnonzero(labels == activity)[:per_activity]):
            item = dataset[int(index)]
            image, mask = denormalize(item["image"]), item["mask"].numpy()
            axes[2 * row, col].imshow(image)
            axes[2 * row + 1, col].imshow(overlay(image, mask, palette, alpha))
            axes[2 * row, col].set_title(spec.activities[activity], fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.legend(handles=legend_handles(spec.seg_classes, palette), loc="lower center",
               ncol=min(4, spec.num_seg_classes), fontsize=8, frameon=False)
    fig.suptitle(f"{spec.name} {dataset.split}: images and masks - {data_label(dataset)}", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    return fig


def plot_distributions(dataset, pixel_fractions: np.ndarray) -> Figure:
    """Activity counts (bar) and per-activity segmentation class pixel fractions (heatmap)."""
    import seaborn as sns

    spec = dataset.spec
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.4 * spec.num_activities + 2.5),
                                      gridspec_kw={"width_ratios": [1, 2]})
    counts = dataset.class_counts()
    left.barh(spec.activities, counts, color="steelblue")
    left.invert_yaxis()
    left.set_xlabel("images")
    left.set_title("activities")
    # Background dwarfs everything else: show each class's share of the foreground pixels.
    foreground = pixel_fractions[:, 1:]
    totals = foreground.sum(1, keepdims=True)
    shares = np.divide(foreground, totals, out=np.zeros_like(foreground), where=totals > 0)
    sns.heatmap(shares, ax=right, annot=spec.num_seg_classes <= 8, fmt=".2f", cmap="mako",
                xticklabels=spec.seg_classes[1:], yticklabels=spec.activities,
                cbar_kws={"label": "share of foreground pixels"})
    right.set_title("foreground classes by activity")
    right.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{spec.name} {dataset.split} - {data_label(dataset)}", fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a figure atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)


def plot_prediction(sample: dict, spec, ax_row=None, alpha: float = 0.6) -> Figure | None:
    """Image, ground truth and prediction of one :func:`endoarss_lib.engine.predict` sample, side by side."""
    palette = class_palette(spec.num_seg_classes)
    fig = None
    if ax_row is None:
        fig, ax_row = plt.subplots(1, 3, figsize=(9, 3.4))
    truth = spec.activities[sample["label"]]
    guess = spec.activities[sample["pred_label"]] if "pred_label" in sample else "-"
    panels = [("image", sample["image"]), (f"truth: {truth}", overlay(sample["image"], sample["mask"], palette, alpha))]
    if "pred_mask" in sample:
        panels.append((f"predicted: {guess}", overlay(sample["image"], sample["pred_mask"], palette, alpha)))
    for ax, (title, picture) in zip(ax_row, panels):
        ax.imshow(picture)
        ax.set_title(title, fontsize=9, color="black" if "predicted" not in title or guess == truth else "crimson")
        ax.axis("off")
    if fig is not None:
        fig.legend(handles=legend_handles(spec.seg_classes, palette), loc="lower center", fontsize=7,
                   ncol=min(4, spec.num_seg_classes), frameon=False)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def prediction_browser(samples: list[dict], spec, note: str = ""):
    """An ipywidgets browser: a slider over samples, showing image, truth and prediction."""
    import ipywidgets as widgets

    output = widgets.Output()
    slider = widgets.IntSlider(value=0, min=0, max=len(samples) - 1, description="sample",
                               continuous_update=False)
    caption = widgets.HTML()

    def show(change=None):
        sample = samples[slider.value]
        caption.value = f"<b>{Path(sample['path']).name}</b> {note}"
        with output:
            output.clear_output(wait=True)
            fig = plot_prediction(sample, spec)
            plt.show(fig)

    slider.observe(show, names="value")
    show()
    return widgets.VBox([slider, caption, output])


def plot_training_curves(log, title: str) -> Figure:
    """Training losses and validation metrics per epoch from a run's log.csv (a DataFrame)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    for column in [c for c in log.columns if c.startswith("train_loss_")]:
        left.plot(log["epoch"], log[column], marker="o", label=column.replace("train_loss_", "loss "))
    left.set_xlabel("epoch")
    left.set_title("training loss")
    left.legend()
    for column in ("val_cls_accuracy", "val_seg_miou", "val_seg_miou_fg", "val_select"):
        if column in log:
            right.plot(log["epoch"], log[column], marker="o", label=column.replace("val_", ""))
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.set_title("validation")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
