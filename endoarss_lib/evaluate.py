"""Command line: evaluate the authors' released checkpoint with this project's (correct and ``compat_``) metrics.

    python -m endoarss_lib.evaluate --released CHECKPOINT --data-root ROOT --dataset mtlesd \\
        [--image-size 244] [--device cpu] [--id-map released] [--out result.json]
    python -m endoarss_lib.evaluate --random-init --data-root ROOT --dataset mtlesd ...   (no checkpoint)

The checkpoint is loaded strictly into the released architecture (``endoarss_lib.models.released``), the test split
is read with ``MTLDataset`` (resized once to ``--image-size``, 244 as released, ImageNet-normalised; the model undoes
the normalisation, so it sees pixel / 255 as the released code does) and ``engine.evaluate`` computes every metric
(boundary distances and SSIM included) in fp32. The result row has the schema of every result row
(:class:`endoarss_lib.training.rows.ResultRow`, ``source`` "released"; fields of training such as ``epochs`` are None)
plus ``model_source``, ``checkpoint``, ``checkpoint_sha256``, ``id_map``, ``n_test_images``, ``released_config`` and
``input_convention``.

Masks: the released model's class ``c`` was trained against ``max(raw - 1, 0)`` (raw 0 and raw 1 both background),
so ``--id-map released`` is the default; pass ``identity`` or a JSON file only if you know your masks match the
checkpoint's ids another way.

The evaluation pass itself is :func:`endoarss_lib.training.engine.evaluate` (this module is its command line for
checkpoints; installed as ``endoarss-evaluate``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from .atomic import write_json_atomic
from .cli import add_standard_options, prog, run_command
from .coerce import ConfigError
from .data import DataError, MTLDataset
from .data.dataset import read_id_map
from .models.released import build_released_model, load_released_checkpoint
from .models.weights import WeightsError
from .training.console import showing_progress
from .training.engine import COMPAT_SIZE, RunError, _peak_memory_mib, evaluate, resolve_device
from .training.rows import ResultRow

__all__ = ["evaluate_released", "main", "MODEL_SOURCES"]

MODEL_SOURCES = {"checkpoint": "authors' released checkpoint",
                 "random": "released architecture, RANDOM weights (no checkpoint)"}
_ARCHS = ("MOLA", "HPS", "MMoE", "DSelect_k", "PLE", "CGC", "MTAN", "LTB", "Cross_stitch")


def _weighting_from_name(path: str | None) -> str | None:
    """The weighting named in a released file name (``mtl_<arch>_<weighting>_best_...``), e.g. 'DB_MTL'."""
    if path is None:
        return None
    m = re.match(rf"mtl_(?:{'|'.join(_ARCHS)})_(.+?)_best_", Path(path).name)
    return m.group(1) if m else None


def _id_map(value):
    if value is None or value in ("identity", "released", "spec"):
        return None if value == "spec" else value

    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"--id-map {value}: expected released, identity, spec or an existing JSON file "
                          f"{{\"raw_to_train\": {{\"<raw>\": <train id>}}}}")
    return read_id_map(path)


def _load_model(checkpoint, random_init: bool, dataset: str, seed: int, arch: dict):
    if random_init:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("default")
            torch.manual_seed(seed)
            return build_released_model(dataset, **arch)
    return load_released_checkpoint(checkpoint, dataset, **arch)


def evaluate_released(checkpoint: str | Path | None, data_root: str | Path, dataset: str = "mtlesd", *,
                      image_size: int = 244, device: str = "cpu", batch_size: int = 16, num_workers: int = 0,
                      id_map="released", random_init: bool = False, seed: int = 0, distances: bool = True,
                      amp: str = "off", arch: dict | None = None, progress: bool = False) -> dict:
    """Evaluate the released model (``checkpoint``, or random weights with ``random_init=True``) on the test split
    of ``data_root``; returns the result row (see the module docstring)."""
    if (checkpoint is None) == (not random_init):
        raise ValueError("pass exactly one of a checkpoint (--released PATH) or random_init=True (--random-init)")
    start = time.perf_counter()
    torch_device = resolve_device(device)
    data = MTLDataset(data_root, "test", dataset=dataset, image_size=image_size, id_map=id_map)
    spec = data.spec
    model = _load_model(checkpoint, random_init, dataset, seed, dict(arch or {})).to(torch_device).eval()
    cfg = model.config
    if (cfg.num_activities, cfg.num_seg_classes) != (spec.num_activities, spec.num_seg_classes):
        raise ValueError(f"the model has K={cfg.num_activities} activities and S={cfg.num_seg_classes} classes, the "
                         f"dataset {spec.name!r} at {data_root} has {spec.num_activities} and {spec.num_seg_classes}")
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    test = evaluate(model, loader, torch_device, model.tasks, spec=spec, distances=distances, amp=amp,
                    progress=progress, compat_size=COMPAT_SIZE)
    report = model.parameter_report()
    full = cfg.embed_dim == 768 and cfg.depth == 12
    return ResultRow.with_provenance(
        torch_device, source="released", dataset=dataset, data="synthetic" if data.synthetic else "real",
        backbone="released_dinov2_vitb14" if full else f"released_vit_d{cfg.depth}_c{cfg.embed_dim}",
        arch="released (MOLA: hard parameter sharing)", sma=True,
        weighting=_weighting_from_name(None if checkpoint is None else str(checkpoint)), tasks="+".join(model.tasks),
        connector="none", cls_loss="ce", pretrained=model.weights.get("sha256") or "random init",
        weights_sha256=model.weights.get("sha256"), random_init_backbone=bool(model.pretrained_random_init),
        synthetic_pretrained_backbone=False, seed=seed if random_init else None, preset="released",
        image_size=image_size, compat_eval_size=COMPAT_SIZE, metrics={f"test_{k}": v for k, v in test.items()},
        params_total=report["total"]["total"], params_trainable=report["total"]["trainable"],
        wall_time_s=round(time.perf_counter() - start, 2), peak_memory_mib=round(_peak_memory_mib(torch_device), 1),
        peak_memory_kind="cuda max allocated" if torch_device.type == "cuda" else "process peak RSS",
        deterministic=torch.are_deterministic_algorithms_enabled(), data_fingerprint={"test": data.fingerprint()},
        extra={"model_source": MODEL_SOURCES["random" if random_init else "checkpoint"],
               "checkpoint": None if checkpoint is None else str(checkpoint),
               "checkpoint_sha256": model.weights.get("sha256"),
               "id_map": id_map if isinstance(id_map, str) or id_map is None else "custom",
               "n_test_images": len(data), "released_config": cfg.to_dict(),
               "input_convention": model.preprocessing}).to_dict()


def _arch_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--arch {text!r}: expected KEY=VALUE, e.g. depth=2")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("endoarss_lib.evaluate", "endoarss-evaluate"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_standard_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--released", metavar="CHECKPOINT", help="the authors' .pt file (loaded strictly)")
    src.add_argument("--random-init", action="store_true", help="no checkpoint: the released architecture with "
                                                                "random weights (labelled as such)")
    p.add_argument("--data-root", required=True, help="dataset root holding test/<activity>/image|mask")
    p.add_argument("--dataset", default="mtlesd", help="registry name: mtlesd | mtlendovis | ...")
    p.add_argument("--image-size", type=int, default=244, help="evaluation resolution (released: 244)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--id-map", default="released", help="mask ids: released (default: raw k -> k-1, as the "
                                                         "checkpoints were trained) | identity | spec | a JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights")
    p.add_argument("--amp", default="off", choices=("off", "auto", "bf16"), help="autocast (default fp32)")
    p.add_argument("--no-distances", action="store_true", help="skip HD / HD95 / SSIM (faster)")
    p.add_argument("--arch", action="append", type=_arch_option, default=[], metavar="KEY=VALUE",
                   help="released-architecture override for test-size files only (e.g. depth=2 embed_dim=32); "
                        "the default is the released ViT-B/14")
    p.add_argument("--out", help="write the result row as JSON here")
    p.add_argument("--progress", action="store_true")
    return p


def main(argv=None) -> int:
    """Entry point; prints the result row as JSON; returns the exit status: 0, 1 (the checkpoint, the data or a file
    cannot be used; the message names it) or 2 (a bad option: unknown dataset, id map, architecture option, or a
    checkpoint that does not fit the dataset). ``--debug`` shows tracebacks."""
    args = _parser().parse_args(argv)
    with showing_progress("info"):  # the package's log lines (device chosen, warnings) on stderr
        return run_command(lambda: _run(args), debug=args.debug,
                           failures=(WeightsError, DataError, RunError, FileNotFoundError, OSError),
                           usage=(ValueError, TypeError))


def _run(args) -> int:
    checkpoint = None if args.released is None else Path(args.released).expanduser()
    row = evaluate_released(checkpoint, Path(args.data_root).expanduser(), args.dataset, image_size=args.image_size,
                            device=args.device, batch_size=args.batch_size, num_workers=args.workers,
                            id_map=_id_map(args.id_map), random_init=args.random_init, seed=args.seed,
                            distances=not args.no_distances, amp=args.amp, arch=dict(args.arch),
                            progress=args.progress)
    if args.out:
        write_json_atomic(Path(args.out).expanduser(), row)
    print(json.dumps(row, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
