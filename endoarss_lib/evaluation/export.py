"""Command line: export a trained run for deployment, with its LoRA merged into the frozen weights.

    endoarss-export MODEL --out DIR [--format pt2,onnx] [--name model] [--image-size N] [--overwrite]

MODEL is a run folder (``config.json`` + ``best.pt``) or a run's checkpoint beside its ``config.json``. The model is
rebuilt, every shared LoRA is folded into its frozen weight (``W0 + (alpha / r) B A``,
:func:`endoarss_lib.models.lora.fold_lora`; wrappers left with nothing to add become plain ``nn.Linear`` layers; the
per-task TESLA / expert adapters stay, merged in the same graph) and the model is exported with a dynamic batch size:

* ``<name>.pt2``: a ``torch.export`` program (``torch.export.load(path).module()(images)`` gives ``{task: logits}``;
  ``endoarss-predict`` runs it directly);
* ``<name>.onnx``: ONNX through ``torch.onnx.export(..., dynamo=True)``, input ``images`` (batch, 3, s, s), one
  output per task (``cls``: (batch, K) logits, ``seg``: (batch, S, s, s) logits). Needs the ``export`` extra
  (``pip install 'endoarss[export]'``: onnx, onnxscript; onnxruntime for the parity check);
* ``<name>.json``: the record: input side, normalisation (mean / std, as in training), tasks and class names, output
  shapes, where the model came from, and the parity of each file.

Parity is checked before a file is put in place: the merged model against the unmerged one, and every exported file
against the PyTorch model on random inputs of two batch sizes (max absolute difference <= ``--atol``, default 1e-4);
a file that differs more is not written. Exit status: 0 done, 1 a model that cannot be used or exported, 2 a bad
option, 130 interrupted.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, write_json_atomic
from ..cli import add_standard_options, prog, run_command
from ..coerce import ConfigError
from ..data import DataError
from ..data.dataset import normalization_stats
from ..models.lora import fold_lora, lora_modules
from ..models.weights import WeightsError
from ..training.engine import CheckpointMismatch, RunError
from ..version import __version__
from .loading import EXPORT_FORMAT, InferenceModel, load_inference_model

__all__ = ["export_model", "merged_model", "max_difference", "missing_onnx_packages", "FORMATS", "main"]

FORMATS = ("pt2", "onnx")
ONNX_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) needs
_EXTRA = "pip install 'endoarss[export]' (onnx, onnxscript, onnxruntime)"


def missing_onnx_packages() -> list[str]:
    """The packages ONNX export needs that are not installed (empty: it can run)."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def merged_model(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """A copy of ``model`` in eval mode with every shared LoRA folded into its frozen weight
    (:func:`~endoarss_lib.models.lora.fold_lora`); returns it and how many LoRA wrappers became plain layers."""
    merged = copy.deepcopy(model).eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged, fold_lora(merged)


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two ``{task: tensor}`` outputs (same tasks and shapes, else inf)."""
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for key in a:
        x, y = torch.as_tensor(a[key]).float().cpu(), torch.as_tensor(b[key]).float().cpu()
        if x.shape != y.shape:
            return float("inf")
        worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
    return worst


def _inputs(size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=generator) for n in (2, 3)]


def _parity(reference, candidate, inputs, what: str, atol: float, path: Path) -> float:
    worst = max(max_difference(reference(x), candidate(x)) for x in inputs)
    if not worst <= atol:
        raise RunError(f"{path}: the {what} differs from the PyTorch model by {worst:.3g} (max absolute difference "
                       f"of the logits on random inputs; tolerance {atol:g}), so it was not written. Report this with "
                       f"the command line and rerun with --debug")
    return worst


@torch.no_grad()
def _export_pt2(merged, reference, inputs, path: Path, atol: float) -> tuple[torch.export.ExportedProgram, float]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's own notes (deprecations, guards) are not the user's concern
        program = torch.export.export(merged, (inputs[0],), dynamic_shapes={"images": {0: batch}})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.export.save(program, f)
        with open(tmp, "rb") as f:  # a file object: the temporary name does not end in .pt2
            loaded = torch.export.load(f).module()
        worst = _parity(reference, loaded, inputs, "exported program (torch.export, saved and loaded)", atol, path)
    return program, worst


@torch.no_grad()
def _export_onnx(program, tasks, reference, inputs, path: Path, atol: float) -> float | None:
    """ONNX from the exported program; its parity through onnxruntime (None when onnxruntime is missing)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, (inputs[0],), dynamo=True, input_names=["images"],
                                         output_names=list(tasks), dynamic_shapes={"images": {0: batch}},
                                         verbose=False, optimize=True)
        onnx_program.save(str(tmp))
        if importlib.util.find_spec("onnxruntime") is None:
            return None
        import onnxruntime  # the 'export' extra: only for this parity check

        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def run(x):
            return dict(zip(names, (torch.from_numpy(np.asarray(v)) for v in session.run(None, {"images": x.numpy()}))))

        return _parity(reference, run, inputs, "ONNX model (run with onnxruntime)", atol, path)


def _formats(text: str | tuple | list) -> tuple[str, ...]:
    items = [f.strip().lower() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise ConfigError(f"--format {text}: expected one or more of {', '.join(FORMATS)} (comma-separated)")
    return tuple(dict.fromkeys(items))


def export_model(model: str | Path | InferenceModel, out: str | Path, *, formats=FORMATS, name: str = "model",
                 image_size: int | None = None, atol: float = 1e-4, overwrite: bool = False,
                 skip_missing_onnx: bool = False) -> dict:
    """Export ``model`` (a run folder, a checkpoint beside its config.json, or an :class:`InferenceModel` of one)
    with its LoRA merged, as the module docstring says; returns the record written as ``<out>/<name>.json``.
    ``skip_missing_onnx``: leave ONNX out (with a warning) instead of failing when its packages are missing."""
    start = time.perf_counter()
    formats = _formats(formats)
    out = Path(out).expanduser()
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--name {name!r}: expected a plain file name without suffix, e.g. model")
    missing = missing_onnx_packages() if "onnx" in formats else []
    if missing:
        if not skip_missing_onnx:
            raise ConfigError(f"--format onnx: ONNX export needs {', '.join(missing)}, not installed here; {_EXTRA}, "
                              f"or export with --format pt2 only")
        warnings.warn(f"ONNX left out: {', '.join(missing)} not installed ({_EXTRA})", stacklevel=2)
        formats = tuple(f for f in formats if f != "onnx")
    targets = {f: out / f"{name}.{f}" for f in formats}
    record_path = out / f"{name}.json"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a folder (created if missing)")
    existing = [str(p) for p in [*targets.values(), record_path] if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"--out {out}: {existing} exist already (left as they are); choose another --out or "
                          f"--name, or pass --overwrite")
    loaded = model if isinstance(model, InferenceModel) else load_inference_model(model, "cpu")
    if loaded.module is None:
        raise ConfigError(f"{loaded.source.get('path')}: is an exported model already; export a run folder (or a "
                          f"run's checkpoint beside its config.json)")
    size = loaded.image_size if image_size is None else int(image_size)
    if size < 14:
        raise ConfigError(f"--image-size {size}: expected an int >= 14 (the model's input side in pixels)")
    reference = copy.deepcopy(loaded.module).cpu().eval()
    merged, folded = merged_model(reference)
    inputs = _inputs(size)
    with torch.no_grad():
        merge_diff = _parity(reference, merged, inputs, "model with its LoRA merged", atol, out)
    parity = {"merged_vs_unmerged": merge_diff}
    out.mkdir(parents=True, exist_ok=True)
    program = None
    if "pt2" in formats or "onnx" in formats:
        if "pt2" in formats:
            program, parity["pt2"] = _export_pt2(merged, reference, inputs, targets["pt2"], atol)
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(merged, (inputs[0],), dynamic_shapes={
                    "images": {0: torch.export.Dim("batch", min=1, max=4096)}})
    if "onnx" in formats:
        parity["onnx"] = _export_onnx(program, loaded.tasks, reference, inputs, targets["onnx"], atol)
    mean_std = normalization_stats(loaded.normalize)
    shapes = {"cls": ["batch", len(loaded.activities)], "seg": ["batch", len(loaded.seg_classes), size, size],
              "presence": ["batch", len(loaded.instruments)]}
    record = {
        "format": EXPORT_FORMAT, "endoarss_version": __version__, "torch_version": torch.__version__,
        "files": {f: p.name for f, p in targets.items()},
        "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32",
                  "preprocess": "RGB, resized to image_size x image_size (bilinear, antialiased), divided by 255, "
                                "then (x - mean) / std per channel",
                  "mean": None if mean_std is None else list(mean_std[0]),
                  "std": None if mean_std is None else list(mean_std[1])},
        "outputs": {t: {"shape": shapes.get(t), "kind": "logits"} for t in loaded.tasks},
        "image_size": size, "normalize": loaded.normalize if isinstance(loaded.normalize, str)
        else [list(v) for v in loaded.normalize],
        "tasks": list(loaded.tasks), "activities": list(loaded.activities), "seg_classes": list(loaded.seg_classes),
        "instruments": list(loaded.instruments), "run": loaded.source.get("path"),
        "checkpoint": loaded.source.get("checkpoint"), "config_hash": loaded.source.get("config_hash"),
        "lora": {"wrappers_folded": folded, "wrappers_kept_with_group_adapters": sum(1 for _ in lora_modules(merged))},
        "parity_max_abs_diff": {k: (None if v is None else float(v)) for k, v in parity.items()},
        "parity_atol": atol, "parity_note": None if "onnx" not in formats or parity.get("onnx") is not None
        else "ONNX parity not checked: onnxruntime is not installed",
        "wall_time_s": round(time.perf_counter() - start, 2)}
    write_json_atomic(record_path, record)
    return record


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("endoarss_lib.evaluation.export", "endoarss-export"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_standard_options(p)
    p.add_argument("model", help="a run folder (config.json + best.pt) or a run's checkpoint beside its config.json")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--format", default=None, help="pt2, onnx or pt2,onnx (default: both; ONNX left out with a "
                                                  "warning when its packages are missing)")
    p.add_argument("--name", default="model", help="file names: <name>.pt2, <name>.onnx, <name>.json")
    p.add_argument("--image-size", type=int, help="input side (default: the run's image_size)")
    p.add_argument("--atol", type=float, default=1e-4, help="parity tolerance on the logits (default 1e-4)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same name")
    return p


def main(argv=None) -> int:
    """Entry point; prints the record; returns the exit status (0, 1, 2 or 130)."""
    args = _parser().parse_args(argv)
    return run_command(lambda: _run(args), debug=args.debug,
                       failures=(DataError, RunError, CheckpointMismatch, WeightsError, OSError),
                       usage=(ValueError, TypeError))


def _run(args) -> int:
    record = export_model(args.model, args.out, formats=args.format or FORMATS, name=args.name,
                          image_size=args.image_size, atol=args.atol, overwrite=args.overwrite,
                          skip_missing_onnx=args.format is None)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
