"""Strict loading of backbone weights from a local file (official DINOv2 ``.pth``, ``.safetensors``) or the hub.

The released EndoARSS code loaded its encoder with ``strict=False`` and never looked at the result, so a naming
mismatch silently left the backbone random. Here every missing or unexpected key is an error that names the keys and
the file, unless the caller lists it (fnmatch patterns) in ``allow_missing`` / ``allow_unexpected``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import pickle
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

__all__ = ["WeightsError", "RandomInitWarning", "read_state_dict", "file_sha256", "load_state_dict_strict",
           "hub_offline", "hub_mode", "why_unreadable", "key_prefix"]


class WeightsError(RuntimeError):
    """A checkpoint does not match the model (missing / unexpected keys, shapes) or cannot be obtained."""


class RandomInitWarning(UserWarning):
    """A backbone meant to be pretrained was randomly initialised."""


_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the project's own hub downloads (``pretrained=True``) run offline. As in timm and Hugging Face: online
    unless ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to 1 / true, in which case a missing cache fails
    at once instead of retrying. ``ENDOARSS_ALLOW_HUB`` (this project's old switch, which defaulted to offline) is a
    deprecated alias: ``ENDOARSS_ALLOW_HUB=0`` still means offline, ``=1`` is the default now; either warns.
    Nothing else in the process is affected: importing the package sets no environment variable."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "0").strip().lower() in _TRUE:
            return True
    legacy = os.environ.get("ENDOARSS_ALLOW_HUB")
    if legacy is not None:
        offline = legacy.strip().lower() not in _TRUE
        warnings.warn(f"ENDOARSS_ALLOW_HUB={legacy!r} is deprecated: hub downloads are online by default (as in timm "
                      f"and Hugging Face); set HF_HUB_OFFLINE=1 to keep them offline"
                      + (" (treated as HF_HUB_OFFLINE=1 now)" if offline else " (no longer needed)"),
                      FutureWarning, stacklevel=2)
        return offline
    return False


@contextmanager
def hub_mode():
    """Within the project's own hub call only: huggingface_hub offline per :func:`hub_offline` (restored after)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = hub_offline()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def why_unreadable(path: str | os.PathLike, exc: BaseException) -> str:
    """What a file that torch / safetensors could not read is, in words (never torch's advice to unpickle it)."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        return "the file is empty (a copy or a write was interrupted?)"
    if type(exc).__name__ == "SafetensorError":
        return f"not a complete .safetensors file ({exc}): truncated or damaged"
    with open(path, "rb") as f:
        head = f.read(4)
    pickled = ("a torch file holding pickled Python objects other than tensors (a whole model or another program's "
               "data, saved with torch.save(obj)); such objects are not unpickled here, because unpickling runs code")
    if zipfile.is_zipfile(path):
        if isinstance(exc, pickle.UnpicklingError):
            return pickled
        return f"a torch zip file that cannot be read ({type(exc).__name__}): damaged"
    if isinstance(exc, pickle.UnpicklingError) and head.startswith(b"\x80"):  # a legacy (non-zip) torch pickle
        return pickled
    if head.startswith(b"PK"):
        return f"an incomplete torch zip file ({size} bytes): truncated while it was written or copied"
    return f"not a torch or safetensors file ({size} bytes that neither can read): damaged, or of another program"


_RESAVE = ("save the weights again as a state dict (torch.save(model.state_dict(), path), or "
           "safetensors.torch.save_file) or copy the original file again")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``); unwrap ``model`` etc.

    A file that is missing, empty, truncated, of another format or holding pickled objects is an error naming the
    file, saying what it is not, and what to do (:class:`WeightsError`; FileNotFoundError for a missing file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (expected an existing .pth / .safetensors file)")
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message naming the file
        raise WeightsError(f"{path}: cannot read weights: {why_unreadable(path, exc)}. Expected a state dict of "
                           f"tensors (.pth / .safetensors); {_RESAVE}") from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping) and len(sd) <= 4:
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        kind = type(sd).__name__ if not isinstance(sd, Mapping) else (
            f"a mapping with non-tensor entries {[k for k, v in sd.items() if not isinstance(v, torch.Tensor)][:5]}")
        raise WeightsError(f"{path} does not hold a flat state dict of tensors (found {kind}; a training "
                           f"checkpoint with optimizer state, perhaps?); {_RESAVE}")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):  # DistributedDataParallel prefix
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _fmt(keys: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def key_prefix(keys: Sequence[str], model_keys: Sequence[str]) -> tuple[str, int]:
    """The prefix that, stripped from ``keys``, makes the most of them model keys (``teacher.backbone.`` of a DINO
    training checkpoint, ``encoder.``, ...), and how many model keys it matches; ``('', n)`` when none does better
    than the keys as they are."""
    own = set(model_keys)
    direct = sum(k in own for k in keys)
    counts: Counter = Counter()
    for key in keys:
        for i, char in enumerate(key):
            if char == "." and key[i + 1:] in own:
                counts[key[:i + 1]] += 1
    if not counts:
        return "", direct
    # the most matches; on a tie the teacher (what DINO evaluates and releases), then the shortest prefix
    prefix, n = max(counts.items(), key=lambda item: (item[1], "teacher" in item[0], -len(item[0])))
    return (prefix, n) if n > direct else ("", direct)


def _advice(sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], missing: Sequence[str],
            source: str) -> str:
    """What to do about a failed strict load, never advice that would leave the backbone random."""
    prefix, matched = key_prefix(list(sd), list(own))
    if prefix and matched >= len(own) // 2:
        out = f"{Path(source).with_suffix('')}_stripped.pth"
        return (f"  The file's keys carry the prefix {prefix!r}: without it {matched} of the model's {len(own)} keys "
                f"match (a DINO / iBOT training checkpoint holds the teacher and student like this). Save the "
                f"backbone alone, without the prefix, and pass that file:\n"
                f"    python -c \"import torch; from endoarss_lib.models.weights import read_state_dict; "
                f"sd = read_state_dict('{source}'); torch.save({{k[{len(prefix)}:]: v for k, v in sd.items() if "
                f"k.startswith('{prefix}')}}, '{out}')\"\n"
                f"  Do not use weights_allow_missing for this: the backbone would stay randomly initialised.")
    if missing and len(missing) > max(2, len(own) // 10):
        return (f"  {len(missing)} of the model's {len(own)} tensors are not in the file: it does not hold weights for "
                f"this backbone (another architecture or size?). Choose the backbone the file was trained for, or the "
                f"file for this backbone. Allowing the missing keys (weights_allow_missing) would train on a randomly "
                f"initialised backbone: do not.")
    return ("  When a few keys are known to differ (e.g. a head the file lacks or extra buffers it has), the model "
            "options weights_allow_missing= / weights_allow_unexpected= accept those named keys (fnmatch patterns); "
            "the backbone's own weights must all load.")


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    convert: Callable[[dict, nn.Module], dict] | None = None,
) -> None:
    """Load ``state_dict`` (after ``convert``) into ``model``; :class:`WeightsError` names bad keys and the source."""
    sd = dict(state_dict)
    if convert is not None:
        sd = convert(sd, model)
    own = model.state_dict()
    unexpected = sorted(k for k in sd if k not in own and not _matches(k, allow_unexpected))
    missing = sorted(k for k in own if k not in sd and not _matches(k, allow_missing))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in sd if k in own and sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        lines = [f"strict weight loading failed for {type(model).__name__} from {source}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_fmt(shapes)}")
        lines.append(_advice(sd, own, missing, source))
        raise WeightsError("\n".join(lines))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
