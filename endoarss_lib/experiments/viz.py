"""Pictures for notebooks: class palettes, mask overlays, sample grids, class distributions and prediction galleries."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from ..atomic import atomic_path
from ..data.dataset import to_uint8_image
from ..robustness.corrupted_sets import CLEAN
from ..robustness.corruptions import CORRUPTIONS, GROUP_OF, check_names, check_severities, corrupt
from ..robustness.report import _check_frame, column_name, metric_label, severity_table

__all__ = ["class_palette", "overlay", "denormalize", "legend_handles", "show_samples", "plot_distributions",
           "save_figure", "data_label", "plot_prediction", "prediction_browser", "plot_training_curves",
           "per_image_iou", "worst_samples", "confusion_pixels", "confused_samples", "pair_counts", "plot_gallery",
           "shrink_png", "corruption_grid", "plot_severity_curves", "plot_colour_shift", "plot_conflict_curves",
           "plot_conflict_per_block", "plot_routing"]


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


def denormalize(image: torch.Tensor, normalize="imagenet") -> np.ndarray:
    """A normalised (3, H, W) model input back to uint8 (H, W, 3) (:func:`endoarss_lib.data.dataset.to_uint8_image`)."""
    return to_uint8_image(image, normalize)


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
            image, mask = denormalize(item["image"], getattr(dataset, "normalize", "imagenet")), item["mask"].numpy()
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


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100, colors: int | None = None,
                max_side: int | None = None) -> Path:
    """Save a figure atomically; with ``colors`` (and optionally ``max_side``) as a small palette PNG for the
    repository (:func:`shrink_png`)."""
    path = Path(path)
    if colors is None and max_side is None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
        return path

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, bbox_inches="tight", format="png")
    buffer.seek(0)
    return shrink_png(buffer, path, max_side=max_side or 10_000, colors=colors or 256)


def plot_prediction(sample: dict, spec, ax_row=None, alpha: float = 0.6) -> Figure | None:
    """Image, ground truth and prediction of one :func:`endoarss_lib.evaluation.inference.predict` sample, side by
    side."""
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
    for column in ("val_cls_accuracy", "val_seg_miou", "val_seg_miou_fg", "select_score"):
        if column in log:
            right.plot(log["epoch"], log[column], marker="o", label=column.replace("val_", ""))
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.set_title("validation")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ galleries

def per_image_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int = 255,
                  include_background: bool = False) -> float:
    """Mean IoU of one image over the classes in its truth or prediction (foreground only by default; NaN if none)."""
    valid = truth != ignore_index
    ious = []
    for c in range(0 if include_background else 1, num_classes):
        t, p = (truth == c) & valid, (pred == c) & valid
        union = np.count_nonzero(t | p)
        if union:
            ious.append(np.count_nonzero(t & p) / union)
    return float(np.mean(ious)) if ious else float("nan")


def worst_samples(samples: Sequence[dict], num_classes: int, k: int = 3, ignore_index: int = 255) -> list[int]:
    """Positions in ``samples`` of the ``k`` lowest per-image foreground IoUs, worst first (NaN images skipped)."""
    scores = [per_image_iou(s["pred_mask"], s["mask"], num_classes, ignore_index) for s in samples]
    ranked = sorted((score, pos) for pos, score in enumerate(scores) if not np.isnan(score))
    return [pos for _, pos in ranked[:k]]


def confusion_pixels(sample: dict, class_a: int, class_b: int) -> int:
    """Pixels of ``sample`` whose truth is ``class_a`` predicted ``class_b``, plus the reverse."""
    truth, pred = sample["mask"], sample["pred_mask"]
    return int(np.count_nonzero((truth == class_a) & (pred == class_b))
               + np.count_nonzero((truth == class_b) & (pred == class_a)))


def confused_samples(samples: Sequence[dict], class_a: int, class_b: int, k: int = 3) -> list[int]:
    """Positions of up to ``k`` samples with the most ``class_a`` <-> ``class_b`` confused pixels (none if zero)."""
    counts = [confusion_pixels(s, class_a, class_b) for s in samples]
    ranked = sorted(((-n, pos) for pos, n in enumerate(counts) if n > 0))
    return [pos for _, pos in ranked[:k]]


def pair_counts(samples: Sequence[dict], class_a: int, class_b: int) -> dict[str, float]:
    """Over ``samples``: true pixels of the two look-alike classes (``pair_pixels``); of them, those predicted as
    either class (``found``), as the right one (``right``) or as the other one (``swapped``); and the swapped share of
    the found pixels (``swapped_of_found``; NaN when none is found). Read ``swapped`` with ``found``: a model that
    finds neither class swaps nothing."""
    truth = [np.isin(s["mask"], (class_a, class_b)) for s in samples]
    found = int(sum((np.isin(s["pred_mask"], (class_a, class_b)) & t).sum() for s, t in zip(samples, truth)))
    swapped = sum(confusion_pixels(s, class_a, class_b) for s in samples)
    return {"pair_pixels": int(sum(t.sum() for t in truth)), "found": found,
            "right": int(sum(((s["pred_mask"] == s["mask"]) & t).sum() for s, t in zip(samples, truth))),
            "swapped": swapped, "swapped_of_found": swapped / found if found else float("nan")}


def _check_aligned(samples_by_model: Mapping[str, Sequence[dict]]) -> list[dict]:
    if not samples_by_model:
        raise ValueError("samples_by_model is empty: expected {model name: predict() samples}")
    lists = list(samples_by_model.values())
    indices = [[s["index"] for s in samples] for samples in lists]
    if any(ix != indices[0] for ix in indices):
        raise ValueError("samples_by_model: every model's samples must cover the same dataset indices in order")
    return lists[0]


def _prediction_title(name: str | None, sample: dict, spec, show_iou: bool) -> tuple[str, str]:
    lines = [] if name is None else [name]
    colour = "black"
    if show_iou:
        lines.append(f"fg IoU {per_image_iou(sample['pred_mask'], sample['mask'], spec.num_seg_classes):.2f}")
    if "pred_label" in sample:
        lines.append(f"activity: {spec.activities[sample['pred_label']]}")
        colour = "black" if sample["pred_label"] == sample["label"] else "crimson"
    return "\n".join(lines), colour


def plot_gallery(samples_by_model: Mapping[str, Sequence[dict]], spec, positions: Sequence[int] | None = None, *,
                 label: str, title: str = "predictions", row_notes: Sequence[str] | None = None,
                 alpha: float = 0.6, show_iou: bool = True, cell: float = 2.0) -> Figure:
    """Rows = images, columns = image, ground truth and each model's prediction (Fig. 5 style), class legend below.

    ``samples_by_model`` maps a model name to its :func:`endoarss_lib.evaluation.inference.predict` samples (same
    images, same order); ``positions`` picks rows (default all); ``label`` (e.g. :func:`data_label`) goes into the
    title. Each prediction is captioned with its per-image foreground IoU and, for multi-task models, the predicted
    activity (red when wrong).
    """
    reference = _check_aligned(samples_by_model)
    positions = list(range(len(reference))) if positions is None else list(positions)
    if not positions:
        raise ValueError("positions is empty: nothing to plot")
    if row_notes is not None and len(row_notes) != len(positions):
        raise ValueError(f"row_notes has {len(row_notes)} entries, expected one per position ({len(positions)})")
    palette = class_palette(spec.num_seg_classes)
    rows, cols = len(positions), 2 + len(samples_by_model)
    height = cell * 1.2 * rows + 1.0
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(cell * cols, height))
    for r, pos in enumerate(positions):
        sample = reference[pos]
        note = f"\n{row_notes[r]}" if row_notes is not None else ""
        axes[r, 0].imshow(sample["image"])
        axes[r, 0].set_title(f"#{sample['index']} {spec.activities[sample['label']]}{note}", fontsize=7)
        axes[r, 1].imshow(overlay(sample["image"], sample["mask"], palette, alpha))
        axes[r, 1].set_title("ground truth", fontsize=7)
        for c, (name, samples) in enumerate(samples_by_model.items(), start=2):
            text, colour = _prediction_title(name if r == 0 else None, samples[pos], spec, show_iou)
            axes[r, c].imshow(overlay(sample["image"], samples[pos]["pred_mask"], palette, alpha))
            axes[r, c].set_title(text, fontsize=7, color=colour)
    for ax in axes.flat:
        ax.axis("off")
    fig.legend(handles=legend_handles(spec.seg_classes, palette), loc="lower center", frameon=False, fontsize=7,
               ncol=min(4, spec.num_seg_classes))
    fig.suptitle(f"{title}\n{label}", fontsize=8)
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1 - 0.35 / height))
    return fig


def shrink_png(src, dst: str | os.PathLike, max_side: int = 1100, colors: int = 256) -> Path:
    """A small copy of a PNG for the repository: at most ``max_side`` pixels a side, palette-quantised (octree,
    which keeps small areas of saturated class colours that median cut merges into their surroundings)."""
    if max_side < 16 or not 2 <= colors <= 256:
        raise ValueError(f"max_side={max_side!r} must be >= 16 and colors={colors!r} in [2, 256]")
    with Image.open(src) as image:
        small = image.convert("RGB")
    small.thumbnail((max_side, max_side), Image.LANCZOS)
    small = small.quantize(colors=colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    with atomic_path(dst) as tmp:
        small.save(tmp, format="PNG", optimize=True)
    return Path(dst)


# ------------------------------------------------------------------------------------------------- robustness

def corruption_grid(image: np.ndarray, names: Sequence[str] | str | None = None,
                    severities: Sequence[int] | int = (1, 2, 3, 4, 5), seed: int = 0, note: str = "",
                    panel_inches: float = 0.9):
    """A figure: one row per corruption (clean image, then each severity), the group beside the name."""
    names, severities = check_names(CORRUPTIONS if names is None else names), check_severities(severities)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image: expected a uint8 (H, W, 3) RGB array (e.g. np.asarray(PIL.Image.open(...)))")
    cols = 1 + len(severities)
    fig, axes = plt.subplots(len(names), cols, squeeze=False,
                             figsize=(panel_inches * cols + 1.3, panel_inches * len(names) + 0.7))
    for row, name in enumerate(names):
        panels = [image] + [corrupt(image, name, s, seed) for s in severities]
        for col, picture in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(picture)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(CLEAN if col == 0 else f"severity {severities[col - 1]}", fontsize=7)
        axes[row, 0].set_ylabel(f"{name}\n({GROUP_OF[name]})", fontsize=6.5, rotation=0, ha="right", va="center")
    fig.suptitle(f"{len(names)} corruptions x {len(severities)} severities{chr(10) + note if note else ''}",
                 fontsize=7.5, y=1 - 0.08 / fig.get_figheight())
    fig.subplots_adjust(wspace=0.04, hspace=0.04, left=0.2, right=0.99, top=1 - 0.62 / fig.get_figheight(),
                        bottom=0.01)
    return fig


def plot_severity_curves(frame: pd.DataFrame, metrics: Sequence[str] = ("cls_accuracy", "seg_miou"),
                         models: Sequence[str] | None = None, note: str = "", percent: bool = True):
    """Fig. 6: each metric against severity (0 = clean), averaged over the corruptions, one line per model."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    table = severity_table(frame, metrics, models, percent=percent)
    _, models = _check_frame(frame, metrics, models)
    fig, axes = plt.subplots(1, len(metrics), squeeze=False, figsize=(4.2 * len(metrics), 3.3))
    for ax, metric in zip(axes[0], metrics):
        for model in models:
            ax.plot(table["severity"], table[column_name(metric, model)], marker="o", label=model)
        ax.set_xticks(table["severity"])
        ax.set_xticklabels([CLEAN if s == 0 else str(s) for s in table["severity"]])
        ax.set_xlabel("severity")
        ax.set_ylabel(f"{metric_label(metric)}{' (%)' if percent else ''}")
        ax.ticklabel_format(axis="y", useOffset=False)
        values = table[[column_name(metric, m) for m in models]].to_numpy(dtype=float)
        low, high = np.nanmin(values), np.nanmax(values)
        span = 5.0 if percent else 0.05  # a flat curve should look flat, not like noise blown up to full height
        if high - low < span:
            ax.set_ylim((low + high) / 2 - span / 2 - span / 10, (low + high) / 2 + span / 2 + span / 10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    n = int(table["n_corruptions"].max())
    fig.suptitle(f"Mean over {n} corruptions per severity{(' - ' + note) if note else ''}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_colour_shift(source, target, n: int = 24, note: str = "") -> Figure:
    """Histograms of the per-image mean R, G, B of two datasets (e.g. a training set and its domain-shifted
    generalisation set), from up to ``n`` images each."""
    def means(dataset):
        return np.stack([dataset.load_raw(i)[0].reshape(-1, 3).mean(0) for i in range(min(n, len(dataset)))])

    a, b = means(source), means(target)
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for channel, (ax, name) in enumerate(zip(axes, "RGB")):
        ax.hist(a[:, channel], bins=12, alpha=0.6, label=source.spec.name)
        ax.hist(b[:, channel], bins=12, alpha=0.6, label=target.spec.name)
        ax.set_title(f"mean {name} per image")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"colour shift{(' - ' + note) if note else ''}", fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ task conflict

def plot_conflict_curves(diag: pd.DataFrame, by: str = "model", note: str = "") -> Figure:
    """Task-gradient conflict over training, one colour per group (``by``) of a ``diagnostics.csv`` frame: the
    cosine per logged step (thin) with its one-epoch moving average (first seed), the share of conflicting steps per
    epoch, the magnitude similarity per epoch, and the median norm ratio ``|g_seg| / |g_cls|`` (log scale)."""
    first_seed = diag["seed"].min() if "seed" in diag else None
    steps_per_epoch = max(1, int(diag.groupby([by, "epoch"]).size().median()))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for name, d in diag.groupby(by, sort=False):
        one = d if first_seed is None else d[d["seed"] == first_seed]
        line, = axes[0].plot(one["step"], one["cosine"], alpha=0.25, lw=0.8)
        colour = line.get_color()
        axes[0].plot(one["step"], one["cosine"].rolling(steps_per_epoch, min_periods=1).mean(), color=colour, lw=2,
                     label=name)
        per_epoch = d.groupby("epoch")
        axes[1].plot(per_epoch["cosine"].apply(lambda c: (c < 0).mean()), marker="o", color=colour)
        axes[2].plot(per_epoch["magnitude_similarity"].mean(), marker="o", color=colour)
        axes[3].semilogy(d.assign(r=d["norm_1"] / d["norm_0"]).groupby("epoch")["r"].median(), marker="o",
                         color=colour)
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set(xlabel="step", ylabel="cosine(g_cls, g_seg)", title="cosine (first seed)")
    axes[1].set(xlabel="epoch (from 0)", ylabel="share with cosine < 0", title="conflicting steps", ylim=(0, 1))
    axes[2].set(xlabel="epoch (from 0)", ylabel="2|g1||g2| / (|g1|^2+|g2|^2)", title="magnitude similarity",
                ylim=(0, 1))
    axes[3].axhline(1, color="grey", lw=0.8)
    axes[3].set(xlabel="epoch (from 0)", ylabel="median |g_seg| / |g_cls|", title="which task dominates")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Task-gradient conflict on the shared trainable parameters{(' - ' + note) if note else ''}",
                 fontsize=8)
    fig.tight_layout()
    return fig


def plot_conflict_per_block(diag: pd.DataFrame, by: str = "model", note: str = "") -> tuple[Figure, pd.DataFrame]:
    """The mean cosine per group and block (``blockNN/cosine`` columns; a connector's too) as a heat map, and per
    epoch for each group; returns (figure, the per-block table)."""
    block_cols = [c for c in diag.columns if c.endswith("/cosine")]
    blocks = [c.split("/")[0] for c in block_cols]
    per_block = diag.groupby(by, sort=False)[block_cols].mean()
    per_block.columns = blocks
    groups = list(per_block.index)
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(4 + 3.2 * len(groups), 3.4), layout="constrained",
                             gridspec_kw={"width_ratios": [1.4] + [1] * len(groups)})
    values = per_block.to_numpy(dtype=float)
    vmax = max(0.1, float(np.nanmax(np.abs(values)))) if values.size else 1.0
    image = axes[0].imshow(values, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    axes[0].set(xticks=range(len(blocks)), xticklabels=blocks, yticks=range(len(groups)), yticklabels=groups,
                title="mean cosine per block")
    axes[0].tick_params(axis="x", rotation=45)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            axes[0].text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=7,
                         color="white" if abs(v) > 0.6 * vmax else "black")
    for k, (ax, (name, d)) in enumerate(zip(axes[1:], diag.groupby(by, sort=False))):
        ax.imshow(d.groupby("epoch")[block_cols].mean().T.to_numpy(dtype=float), cmap="RdBu", vmin=-vmax,
                  vmax=vmax, aspect="auto")
        ax.set(yticks=range(len(blocks)), yticklabels=blocks if k == 0 else [], xlabel="epoch (from 0)", title=name)
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine")
    fig.suptitle(f"Per-block gradient cosine (scale +-{vmax:.2f}){(' - ' + note) if note else ''}", fontsize=8)
    return fig, per_block


def plot_routing(routing: pd.DataFrame, log: pd.DataFrame, note: str = "") -> Figure:
    """A CMoE connector's routing: each task's mean routing weight per expert in the last epoch (against uniform),
    and the Jensen-Shannon divergence between the tasks' routing per epoch (``routing.csv`` and ``log.csv``)."""
    experts = [c for c in routing.columns if c.startswith("expert")]
    last = routing[routing["epoch"] == routing["epoch"].max()].set_index("task")[experts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    last.T.plot.bar(ax=left, rot=0)
    left.axhline(1 / len(experts), color="grey", ls="--", lw=0.8, label="uniform")
    left.set(ylabel="mean routing weight", title="last epoch")
    left.legend(fontsize=8)
    if "routing_js" in log:
        right.plot(log["epoch"], log["routing_js"], marker="o")
    right.set(xlabel="epoch", ylabel="JS divergence (nats)", title="divergence between the tasks' routing")
    fig.suptitle(f"CMoE routing{(' - ' + note) if note else ''}", fontsize=8)
    fig.tight_layout()
    return fig
