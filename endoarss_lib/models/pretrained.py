"""Weight records of the backbones that ship with the package (torchvision-style: file, hash, transforms, metrics).

A record is data: ``endoarss_lib/weights/<name>.json`` beside ``<name>.safetensors``, both written by
``python -m endoarss_lib.foundation``. :func:`list_pretrained` names them, :func:`get_pretrained` returns one
(:class:`PretrainedWeights`), and ``build_model(..., pretrained=NAME)`` resolves the name, checks the file's sha256
and loads it strictly through the same code as a DINOv2 checkpoint (:func:`endoarss_lib.models.weights
.load_state_dict_strict`).

Like torchvision's ``weights.transforms()``, a record says what input its weights expect:
``get_pretrained(NAME).transforms()`` (:class:`WeightsTransforms`: mean/std, input size). :func:`weights_transforms`
answers it for any ``model.pretrained`` value: a bundled name (its record), a weights file (a record JSON beside it,
else the backbone's published normalisation: ImageNet's for DINOv2 and timm's ResNets), the hub or random init
(``False`` or ``"random"``: the backbone's). The data pipeline normalises with it unless ``TrainConfig.normalize``
overrides it.

The bundled weights are **not DINOv2**: a small ViT of DINOv2's architecture pretrained by this project on synthetic
images, so that the default runs adapt a foundation model whose features mean something. Real DINOv2 files are
passed as paths, exactly as before.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..data.dataset import IMAGENET_MEAN, IMAGENET_STD
from .weights import WeightsError, file_sha256

__all__ = ["PretrainedWeights", "WeightsTransforms", "list_pretrained", "get_pretrained", "weights_dir",
           "is_pretrained_name", "is_synthetic_pretrained", "verified_file", "weights_transforms",
           "DEFAULT_PRETRAINED"]

DEFAULT_PRETRAINED = "synthdino_vit_mini14"


def weights_dir() -> Path:
    """The package folder holding the bundled weight records and files."""
    return Path(__file__).resolve().parents[1] / "weights"


@dataclass(frozen=True)
class WeightsTransforms:
    """The input a backbone's weights expect (torchvision's ``weights.transforms()``): RGB in [0, 1] normalised with
    ``mean`` / ``std``, at ``image_size`` (the weights' pretraining side; None: any).

    Calling it on uint8 images ``(3, H, W)`` or ``(B, 3, H, W)`` resizes them to ``size`` (default ``image_size``;
    bilinear, antialiased) and normalises them. :attr:`normalize` is what the data pipeline takes
    (``MTLDataset(normalize=...)``): ``"imagenet"`` for ImageNet's mean/std, else the ``(mean, std)`` pair."""

    mean: tuple
    std: tuple
    image_size: int | None = None
    source: str = ""

    @property
    def normalize(self):
        """``"imagenet"`` when mean/std are ImageNet's, else ``(mean, std)``."""
        if tuple(self.mean) == tuple(IMAGENET_MEAN) and tuple(self.std) == tuple(IMAGENET_STD):
            return "imagenet"
        return tuple(self.mean), tuple(self.std)

    def __call__(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = size or self.image_size
        x = images.float() / 255.0 if not images.is_floating_point() else images.float()
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = TF.resize(x, [size, size], InterpolationMode.BILINEAR, antialias=True)
        return TF.normalize(x, list(self.mean), list(self.std))


@dataclass(frozen=True)
class PretrainedWeights:
    """One bundled weight record."""

    name: str
    file: Path  # absolute path of the .safetensors file
    sha256: str
    backbone: str  # key of models.BACKBONES that build_model must use with these weights
    image_size: int  # pretraining resolution (any multiple of 14 works: the position embedding is resampled)
    mean: tuple  # input normalisation the weights expect (ImageNet's, as DINOv2)
    std: tuple
    description: str = ""
    recipe: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def transforms(self) -> WeightsTransforms:
        """The input these weights expect (their record's mean/std and pretraining size)."""
        return WeightsTransforms(tuple(self.mean), tuple(self.std), self.image_size, source=f"bundled: {self.name}")

    def summary(self) -> dict[str, Any]:
        """The record without its training history (for tables and result rows)."""
        return {"name": self.name, "file": self.file.name, "sha256": self.sha256, "backbone": self.backbone,
                "image_size": self.image_size, "description": self.description, "metrics": dict(self.metrics)}


@lru_cache(maxsize=None)
def _records() -> dict[str, PretrainedWeights]:
    out = {}
    folder = weights_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            d = json.loads(path.read_text())
            out[d["name"]] = PretrainedWeights(
                name=d["name"], file=folder / d["file"], sha256=d["sha256"], backbone=d["backbone"],
                image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                description=d.get("description", ""), recipe=d.get("recipe", {}), data=d.get("data", {}),
                training={k: v for k, v in d.get("training", {}).items()}, metrics=d.get("metrics", {}))
        except (OSError, ValueError, KeyError) as exc:  # a broken record must not hide the others
            raise WeightsError(f"{path}: unreadable weight record ({type(exc).__name__}: {exc})") from None
    return out


def list_pretrained() -> list[str]:
    """Names of the bundled weights (``build_model(..., pretrained=NAME)``)."""
    return sorted(_records())


def is_pretrained_name(value: Any) -> bool:
    """True when ``value`` names a bundled weight record (not a file path)."""
    return isinstance(value, str) and value in _records()


def is_synthetic_pretrained(weights: dict | None) -> bool:
    """True when a model's weights provenance (``model.weights``) names the project's synthetic-pretrained stand-in
    (the bundled ``synth*`` records), which result rows and captions must label as such."""
    return str((weights or {}).get("name") or "").startswith("synth")


def get_pretrained(name: str) -> PretrainedWeights:
    """The record of bundled weights ``name``; ValueError listing the names otherwise."""
    records = _records()
    if name not in records:
        raise ValueError(f"pretrained={name!r} is not a bundled weight record; bundled: {sorted(records)} (or pass a "
                         "path to a weights file)")
    return records[name]


_VERIFIED: dict[tuple, bool] = {}


def verified_file(name: str, backbone: str | None = None) -> PretrainedWeights:
    """The record of ``name`` after checking that its file exists, has the recorded sha256, and fits ``backbone``."""
    rec = get_pretrained(name)
    if backbone is not None and backbone != rec.backbone:
        raise WeightsError(f"pretrained={name!r} holds weights for backbone {rec.backbone!r}, not {backbone!r}: "
                           f"use backbone={rec.backbone!r}")
    if not rec.file.is_file():
        raise WeightsError(f"bundled weights {name!r}: file {rec.file} is missing (a broken install or checkout?); "
                           f"regenerate it with `python -m endoarss_lib.foundation` (see its --help) or reinstall")
    st = os.stat(rec.file)
    key = (str(rec.file), st.st_size, st.st_mtime_ns)
    if not _VERIFIED.get(key):
        digest = file_sha256(rec.file)
        if digest != rec.sha256:
            raise WeightsError(f"bundled weights {name!r}: {rec.file} has sha256 {digest}, but its record says "
                               f"{rec.sha256}; the file was changed or damaged: restore it (git checkout / reinstall)")
        _VERIFIED[key] = True
    return rec


def _record_beside(path: Path) -> dict | None:
    """A weight record (``<stem>.json`` with ``mean`` / ``std``, as ``endoarss_lib.foundation`` writes) beside a weights
    file that names that file, or None."""
    record = path.with_suffix(".json")
    if not record.is_file() or record == path:
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("file", path.name) != path.name or "mean" not in data:
        return None
    return data


def weights_transforms(pretrained: Any, backbone: str | None = None) -> WeightsTransforms:
    """The input transform that ``model.pretrained`` weights expect (see the module docstring): a bundled name's
    record; a file's record beside it, else ``backbone``'s published normalisation; for the hub and random init,
    ``backbone``'s. Never reads the weights themselves."""
    if is_pretrained_name(pretrained):
        return get_pretrained(pretrained).transforms()
    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool) and pretrained != "random":
        data = _record_beside(Path(pretrained))
        if data is not None:
            return WeightsTransforms(tuple(data["mean"]), tuple(data["std"]), data.get("image_size"),
                                     source=f"record beside {Path(pretrained).name}")
    from .backbones import BACKBONES  # the backbone registry imports this module: imported here

    cfg = BACKBONES.get(backbone) if backbone is not None else None
    mean, std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return WeightsTransforms(tuple(mean), tuple(std), None, source=f"backbone {backbone}" if cfg else "ImageNet")
