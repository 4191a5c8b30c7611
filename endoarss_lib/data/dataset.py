"""The multi-task dataset: one loader for the real layouts and the synthetic presets.

Layout (the authors' datasets): ``<root>/<split>/<activity 1..K>/image/<name>.(png|jpg)`` with an index mask
``<root>/<split>/<activity>/mask/<name>.png``. Folder ``k`` holds activity label ``k - 1``.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from .cache import open_cache
from .io import (IMAGE_SUFFIXES, MASK_SUFFIX, VALIDATE_HINT, DataError, map_mask_ids, read_image, read_index_mask,
                 shown_path)
from .loader import fingerprint
from .registry import DatasetSpec, get_spec, resolve_id_map

__all__ = ["Sample", "MTLDataset", "index_split", "stratified_split", "read_card", "JointTransform", "IMAGENET_MEAN",
           "IMAGENET_STD", "SPLITS", "NORMALIZATIONS", "to_uint8_image", "scan_split", "read_id_map", "root_id_map",
           "resolve_spec", "normalization_stats"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
NORMALIZATIONS = ("imagenet", "unit")  # ImageNet mean/std (DINOv2's), or pixels / 255 only (the released code)
CARD_NAME = "dataset_card.json"
ID_MAP_NAME = "id_map.json"
_IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Sample:
    """One image on disk with its mask and activity label."""

    image: Path
    mask: Path
    label: int


def read_card(root: str | Path) -> dict | None:
    """The dataset card beside the data (written by the synthetic generator and the prepare commands), if any."""
    path = Path(root) / CARD_NAME
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); restore the dataset card (the generator and the prepare "
                        f"commands write it)") from None
    if not isinstance(card, dict):
        raise DataError(f"{path}: expected a JSON object (the dataset card), got {type(card).__name__}")
    return card


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _list_dir(folder: Path, what: str, problems: list[str] | None = None) -> list[Path]:
    """The entries of ``folder``; a missing folder is a DataError, or a problem appended to ``problems``. An entry
    whose name is not valid UTF-8 is such a problem too (and left out), so no later step fails on its name."""
    def problem(message: str) -> None:
        if problems is None:
            raise DataError(message)
        problems.append(message)

    if not folder.is_dir():
        problem(f"{shown_path(folder)}: a file where the {what} folder should be (expected a folder)"
                if folder.exists() else f"{shown_path(folder)}: missing {what} folder")
        return []
    entries = []
    for p in sorted(folder.iterdir()):
        if p.name in _IGNORED_NAMES or p.name.startswith("."):
            continue
        if not _utf8(p.name):
            problem(f"{shown_path(p)}: the name is not valid UTF-8 (written in another encoding?); rename it to "
                    f"UTF-8 (e.g. convmv -f latin1 -t utf8 --notest -r <root>), then validate again")
            continue
        entries.append(p)
    return entries


def _index_activity(folder: Path, label: int, problems: list[str]) -> tuple[list[Sample], list[str]]:
    """Samples of one activity folder and notes about stray files that were skipped; every structural problem is
    appended to ``problems`` (each names its path), and the folder's other samples are still indexed."""
    image_dir, mask_dir = folder / "image", folder / "mask"
    image_entries, mask_entries = _list_dir(image_dir, "image", problems), _list_dir(mask_dir, "mask", problems)
    images = [p for p in image_entries if p.suffix.lower() in IMAGE_SUFFIXES]
    masks = [p for p in mask_entries if p.suffix.lower() == MASK_SUFFIX]
    stray = [str(p) for p in image_entries + mask_entries if p not in images and p not in masks]
    if image_dir.is_dir() and not images:
        problems.append(f"{image_dir}: empty activity folder (no {'/'.join(IMAGE_SUFFIXES)} images)")
    stems: dict[str, Path] = {}
    for img in images:
        if img.stem in stems:
            problems.append(f"{img}: two images share the name {img.stem!r} ({stems[img.stem].name}); rename one")
            continue
        stems[img.stem] = img
    mask_stems = {m.stem: m for m in masks}
    no_mask = [str(stems[s]) for s in stems if s not in mask_stems]
    no_image = [str(mask_stems[s]) for s in mask_stems if s not in stems]
    if no_mask and mask_dir.is_dir():
        problems.append(f"{len(no_mask)} image(s) without a mask in {mask_dir} (expected <name>.png): "
                        f"{no_mask[:5]}")
    if no_image and image_dir.is_dir():
        problems.append(f"{len(no_image)} mask(s) without an image in {image_dir}: {no_image[:5]}")
    return [Sample(stems[s], mask_stems[s], label) for s in sorted(stems) if s in mask_stems], stray


def scan_split(root: str | Path, split: str, spec: DatasetSpec) -> tuple[list[Sample], list[str], list[str]]:
    """Every well-formed sample of one on-disk split, sorted, with *all* the split's structural problems and its
    warnings (each naming its path): the one set of rules :func:`index_split` (training) and ``validate`` apply."""
    root = Path(root)
    problems: list[str] = []
    notes: list[str] = []
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        return [], [f"data root {shown_path(root)} {what} (expected <root>/train and <root>/test)"], notes
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        hint = " (this dataset is evaluation-only: use split='test')" if spec.train_on else ""
        return [], [f"{split_dir}: split folder missing; found {present}{hint}"], notes
    entries = _list_dir(split_dir, split, problems)
    folders = {p.name: p for p in entries if p.is_dir()}
    for entry in entries:
        if entry.is_dir():
            continue
        if entry.name in spec.activity_folders or entry.name.isdigit():
            problems.append(f"{entry}: a file where activity folder '{entry.name}' should be (expected a folder "
                            f"holding image/ and mask/); the samples of that activity would be missing")
        else:
            notes.append(f"{split_dir}: skipped {entry.name!r}, a file among the activity folders")
    unknown = sorted(set(folders) - set(spec.activity_folders))
    if unknown:
        problems.append(f"{split_dir}: activity folders {unknown} are not in 1..{spec.num_activities} "
                        f"(dataset {spec.name!r} has {spec.num_activities} activities)")
    evaluated = spec.activity_folders if spec.eval_activities is None else [str(k + 1) for k in spec.eval_activities]
    missing = [f for f in evaluated if f not in folders]
    if missing and spec.train_on is None and not spec.synthetic:  # evaluation-only sets hold a subset by design
        notes.append(f"{split_dir}: no folder for activities {missing} (expected 1..{spec.num_activities}); "
                     f"those activities have no samples in this split")
    samples, stray = [], []
    for name in sorted(set(folders) - set(unknown), key=int):
        found, skipped = _index_activity(folders[name], int(name) - 1, problems)
        samples += found
        stray += skipped
    if stray:
        notes.append(f"{split_dir}: skipped {len(stray)} file(s) that are not images/masks: {stray[:5]}")
    if not samples and not problems:
        problems.append(f"{split_dir}: no samples")
    return samples, problems, notes


def index_split(root: str | Path, split: str, spec: DatasetSpec) -> list[Sample]:
    """Every sample of one on-disk split, sorted; malformed parts are one DataError naming every path."""
    samples, problems, notes = scan_split(root, split, spec)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} problems in {Path(root) / split}:\n  " + "\n  ".join(problems) +
                        f"\n({VALIDATE_HINT})")
    return samples


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/val index lists, stratified by label; every label with >= 2 samples keeps one in train."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: expected a fraction in [0, 1)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(idx.size)]
        n_val = int(round(idx.size * val_fraction))
        n_val = min(max(n_val, 1 if val_fraction > 0 and idx.size >= 2 else 0), idx.size - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def resolve_spec(root: Path, dataset: str) -> tuple[DatasetSpec, bool]:
    """The spec to load ``root`` with, and whether the data are synthetic (from the card beside them)."""
    spec = get_spec(dataset)
    card = read_card(root)
    if not card or not card.get("synthetic"):
        return spec, spec.synthetic
    try:
        held = get_spec(card["dataset"])
    except (KeyError, ValueError):
        raise DataError(f"{root / CARD_NAME}: a synthetic dataset card whose 'dataset' ({card.get('dataset')!r}) is "
                        f"not a registered dataset; restore the card, or generate the set again") from None
    if held.name != spec.name and held.real_counterpart != spec.name:
        raise DataError(f"{root / CARD_NAME}: the folder holds synthetic {held.name!r} data, not dataset={dataset!r}; "
                        f"use dataset={held.real_counterpart or held.name!r} or another data_root")
    return held, True


def read_id_map(path: str | Path) -> Mapping[int, int]:
    """A raw-to-train id map file ``{"raw_to_train": {"<raw id>": <train id>, ...}}``; DataError naming it else."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return {int(k): int(v) for k, v in raw["raw_to_train"].items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: expected {{\"raw_to_train\": {{\"<raw id>\": <train id>, ...}}}} "
                        f"({type(exc).__name__}: {exc})") from None


def _file_id_map(root: Path) -> Mapping[int, int] | None:
    path = root / ID_MAP_NAME
    return read_id_map(path) if path.is_file() else None


def root_id_map(root: str | Path, spec: DatasetSpec, id_map: str | Mapping[int, int] | None = None,
                ignore_index: int | None = None) -> Mapping[int, int]:
    """The raw-to-train map a dataset folder is read with: ``id_map`` if given, else the folder's ``id_map.json``,
    else the dataset's own; a bad map is a DataError naming its file (or ``id_map=``)."""
    root = Path(root)
    from_file = id_map is None and (root / ID_MAP_NAME).is_file()
    try:
        return resolve_id_map(spec, _file_id_map(root) if id_map is None else id_map, ignore_index)
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        where = root / ID_MAP_NAME if from_file else "id_map="
        raise DataError(f"{where}: {exc}") from None


def normalization_stats(normalize) -> tuple[tuple, tuple] | None:
    """``(mean, std)`` of an input normalisation: ``"imagenet"``, ``"unit"`` (None: pixels / 255 only) or a
    ``(mean, std)`` pair of three numbers each (what a weight record says, :mod:`endoarss_lib.models.pretrained`);
    ValueError otherwise."""
    if isinstance(normalize, str):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZATIONS} or a (mean, std) pair")
        return (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else None
    try:
        mean, std = (tuple(float(v) for v in part) for part in normalize)
    except (TypeError, ValueError):
        mean = std = ()
    if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
        raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZATIONS} or a (mean, std) pair of three "
                         "numbers each (std > 0)")
    return mean, std


def to_uint8_image(image: torch.Tensor, normalize="imagenet") -> np.ndarray:
    """A model input (3, H, W) back to a displayable uint8 (H, W, 3) image (undoing ``normalize``: a name or a
    ``(mean, std)`` pair)."""
    rgb = image.detach().cpu().float()
    stats = normalization_stats(normalize)
    if stats is not None:
        rgb = rgb * torch.tensor(stats[1]).view(3, 1, 1) + torch.tensor(stats[0]).view(3, 1, 1)
    return (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class JointTransform:
    """Resize (or augment) an image and its mask together, then normalise the image.

    Masks are resampled with ``NEAREST_EXACT`` (pixel-centre aligned like bilinear ``align_corners=False``); the
    legacy ``NEAREST`` that torchvision uses for masks by default is shifted by up to one pixel against the image.
    """

    def __init__(self, image_size: int, augment: bool = False, resize_mode: str = "stretch",
                 ignore_index: int = 255, scale: tuple[float, float] = (0.5, 1.0), normalize="imagenet"):
        self.stats = normalization_stats(normalize)  # (mean, std), or None for pixels / 255 only
        self.size, self.augment, self.resize_mode, self.normalize = image_size, augment, resize_mode, normalize
        self.ignore_index, self.scale = ignore_index, scale
        self.color = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (3, H, W) image and int64 (H, W) mask -> normalised float image and int64 mask at the model size."""
        mask = mask[None]
        image, mask = self._augment(image, mask) if self.augment else self.geometry(image, mask)
        return self.to_model(image, mask[0])

    def geometry(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic part (no augmentation): uint8 (3, H, W) image and (1, H, W) mask resized or letterboxed
        to the model size; the image stays uint8 (what the data cache stores)."""
        if self.resize_mode == "letterbox":
            return self._letterbox(image, mask)
        return self._resize(image, mask, (self.size, self.size))

    def to_model(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (3, h, w) image at the model size -> float in [0, 1], normalised; the mask as it is."""
        image = image.float() / 255.0
        if self.stats is not None:
            image = TF.normalize(image, list(self.stats[0]), list(self.stats[1]))
        return image, mask

    @staticmethod
    def _resize(image, mask, size):
        return (TF.resize(image, list(size), InterpolationMode.BILINEAR, antialias=True),
                TF.resize(mask, list(size), InterpolationMode.NEAREST_EXACT))

    def _letterbox(self, image, mask):
        """Longest side to the model size, aspect kept; padding is 0 in the image and ignore_index in the mask."""
        h, w = image.shape[-2:]
        factor = self.size / max(h, w)
        nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
        image, mask = self._resize(image, mask, (nh, nw))
        left, top = (self.size - nw) // 2, (self.size - nh) // 2
        padding = [left, top, self.size - nw - left, self.size - nh - top]
        return TF.pad(image, padding, fill=0), TF.pad(mask, padding, fill=self.ignore_index)

    def _augment(self, image, mask):
        """Random scale-crop and horizontal flip on both, colour jitter on the image (torch's global RNG)."""
        top, left, h, w = RandomResizedCrop.get_params(image, scale=list(self.scale), ratio=[0.8, 1.25])
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR,
                                antialias=True)
        mask = TF.resized_crop(mask, top, left, h, w, [self.size, self.size], InterpolationMode.NEAREST_EXACT)
        if torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return self.color(image), mask


class MTLDataset(Dataset):
    """Images, index masks and activity labels of one split, as dicts ``image, mask, label, path``.

    ``split`` is ``'train'``, ``'val'`` (a seeded, stratified ``val_fraction`` of the on-disk train split, never
    used for training when ``split='train'``) or ``'test'``. Images are resized once to ``image_size`` (bilinear;
    masks nearest) and normalised with the ImageNet mean/std (``normalize="unit"``: divided by 255 only, as the
    released code does; a ``(mean, std)`` pair: those, e.g. a weight record's ``transforms().normalize``). After :meth:`use_cache` items come from a decoded-image cache (the same tensors).
    """

    def __init__(self, root: str | Path, split: str, dataset: str = "mtlesd", image_size: int = 224,
                 val_fraction: float = 0.1, split_seed: int = 0, augment: bool = False,
                 resize_mode: str = "stretch", id_map: str | Mapping[int, int] | None = None,
                 ignore_index: int = 255, normalize="imagenet"):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size={image_size!r}: expected an int >= 16")
        if resize_mode not in ("stretch", "letterbox"):
            raise ValueError(f"resize_mode={resize_mode!r}: expected 'stretch' or 'letterbox'")
        self.root = Path(root)
        self.split, self.image_size, self.ignore_index = split, image_size, ignore_index
        self.spec, self.synthetic = resolve_spec(self.root, dataset)
        self.id_map = root_id_map(self.root, self.spec, id_map, ignore_index)
        on_disk = index_split(self.root, "test" if split == "test" else "train", self.spec)
        if split == "test":
            self.samples = on_disk
        else:
            train_idx, val_idx = stratified_split([s.label for s in on_disk], val_fraction, split_seed)
            self.samples = [on_disk[i] for i in (train_idx if split == "train" else val_idx)]
        if not self.samples:
            raise DataError(f"{self.root}: split {split!r} is empty (val_fraction={val_fraction})")
        self.normalize = normalize
        self.transform = JointTransform(image_size, augment, resize_mode, ignore_index, normalize=normalize)
        self.cache = None  # an ImageCache once use_cache() was called

    def use_cache(self, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
        """Read items from a decoded-image cache (built first if missing; :mod:`endoarss_lib.data.cache`): the
        same items, bitwise, without decoding the files every epoch. Returns the cache's folder."""
        self.cache = open_cache(self, cache_dir, progress)
        return self.cache.folder

    def fingerprint(self) -> str:
        """Content hash of this split's files (images, masks) and of the root's side files (card, id map)."""
        return fingerprint(self.root, [p for s in self.samples for p in (s.image, s.mask)])

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """Activity label of every sample, in order."""
        return [s.label for s in self.samples]

    def class_counts(self) -> np.ndarray:
        """Number of samples per activity (length K)."""
        return np.bincount(self.labels, minlength=self.spec.num_activities)

    def pixel_class_fractions(self) -> np.ndarray:
        """(K activities, S classes) fraction of mask pixels of each class among the images of each activity."""
        counts = np.zeros((self.spec.num_activities, self.spec.num_seg_classes), np.int64)
        for index, sample in enumerate(self.samples):
            mask = self.load_raw(index)[1]
            counts[sample.label] += np.bincount(mask.ravel(), minlength=self.spec.num_seg_classes)
        totals = counts.sum(1, keepdims=True)
        return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The sample's image (uint8 HxWx3) and train-id mask (int64 HxW) at their size on disk, checked."""
        sample = self.samples[index]
        image = read_image(sample.image)
        raw = read_index_mask(sample.mask)
        if raw.shape != image.shape[:2]:
            raise DataError(f"{sample.mask}: mask size {raw.shape[1]}x{raw.shape[0]} differs from its image "
                            f"{sample.image} ({image.shape[1]}x{image.shape[0]})")
        return image, map_mask_ids(raw, self.id_map, sample.mask, self.ignore_index)

    def _arrays(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model input and mask of one item, from the files or from the cache (the same tensors)."""
        if self.cache is None:
            image, mask = self.load_raw(index)
            return self.transform(torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(mask))
        image, mask = self.cache.get(index)
        finish = self.transform.to_model if self.cache.resized else self.transform
        return finish(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask))

    def __getitem__(self, index: int) -> dict:
        image_t, mask_t = self._arrays(index)
        sample = self.samples[index]
        return {"image": image_t, "mask": mask_t,
                "label": torch.tensor(sample.label, dtype=torch.long), "path": str(sample.image)}

    def __repr__(self) -> str:
        kind = "synthetic" if self.synthetic else "real"
        return (f"MTLDataset({self.spec.name!r}, split={self.split!r}, n={len(self)}, {kind}, "
                f"image_size={self.image_size}, root={str(self.root)!r})")
