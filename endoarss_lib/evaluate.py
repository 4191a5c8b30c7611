"""Command line: evaluate a run of ours, on its own data or on any registered dataset, or the authors' released
checkpoint, with this project's (correct and ``compat_``) metrics.

    python -m endoarss_lib.evaluate --run RUN_DIR [--split test] [--device cpu] [--out result.json]
    python -m endoarss_lib.evaluate --run RUN_DIR --dataset mtlendovis_gen --data-root ROOT [--image-size N] ...
    python -m endoarss_lib.evaluate --released CHECKPOINT --data-root ROOT --dataset mtlesd \\
        [--image-size 244] [--device cpu] [--id-map released] [--out result.json]
    python -m endoarss_lib.evaluate --random-init --data-root ROOT --dataset mtlesd ...   (no checkpoint)

``--run``: a run folder written by ``endoarss-train`` (``config.json`` + ``best.pt``): its selected model, rebuilt
exactly (:func:`endoarss_lib.evaluation.inference.load_run_model`). Without ``--data-root`` it is evaluated on a
split of its own data, read as training read it (``--split``, default ``test``: the numbers of the run's own
``result.json``, which the row's ``same_data_as_run`` confirms by the data's fingerprint); with ``--data-root`` (and
``--dataset``, default the run's) on that dataset's split, at the run's ``image_size`` unless ``--image-size``, with
the run's normalisation, the extra ``*_eval`` keys averaging over the dataset's evaluated subset
(:func:`endoarss_lib.evaluation.inference.evaluate_run_on`). The result row (``source`` "evaluate"; the run's model
fields, the evaluated data's fingerprint, per-class values) is printed and written to ``--out`` (default:
``evaluate_<dataset>_<split>.json`` in the run folder).

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
from .evaluation.inference import evaluate_run, evaluate_run_on
from .models.released import build_released_model, load_released_checkpoint
from .models.weights import WeightsError
from .tasks import get_task
from .training.console import showing_progress
from .training.engine import (COMPAT_SIZE, CheckpointMismatch, RunError, _peak_memory_mib, evaluate, make_datasets,
                              read_run_config, resolve_device)
from .training.rows import ResultRow

__all__ = ["evaluate_released", "evaluate_run_folder", "main", "MODEL_SOURCES"]

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


_RUN_FIELDS = ("backbone", "arch", "sma", "weighting", "tasks", "connector", "cls_loss", "model_label",
               "paper_backbone", "pretrained", "pretrained_name", "weights_sha256", "random_init_backbone",
               "synthetic_pretrained_backbone", "seed", "preset", "epochs", "best_epoch", "epochs_trained", "patience",
               "select_on", "config_hash", "params_total", "params_trainable")


def _run_fields(folder: Path, cfg) -> dict:
    """The model fields of a run's row: from its ``result.json`` when it has one, else from its config."""
    m = cfg.model
    fields = {"backbone": m.backbone, "arch": m.arch, "sma": bool(m.sma), "weighting": cfg.weighting,
              "tasks": "+".join(cfg.tasks), "connector": m.connector or "none", "cls_loss": cfg.cls_loss,
              "seed": cfg.seed, "preset": cfg.preset, "epochs": cfg.epochs, "select_on": cfg.select_on,
              "config_hash": cfg.results_hash()}
    path = folder / "result.json"
    if path.is_file():
        try:
            row = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{path}: damaged (not JSON); move it away to evaluate the run from its config.json and "
                           f"best.pt, or restore it") from None
        fields.update({k: row[k] for k in _RUN_FIELDS if row.get(k) is not None})
    return fields


def evaluate_run_folder(folder: str | Path, data_root: str | Path | None = None, dataset: str | None = None, *,
                        split: str = "test", image_size: int | None = None, device: str = "cpu",
                        batch_size: int = 8, distances: bool = True) -> dict:
    """A run folder's selected model evaluated on a split of its own data (``data_root`` None) or of the dataset
    ``dataset`` (default the run's) at ``data_root``; returns the result row (see the module docstring)."""
    start = time.perf_counter()
    folder = Path(folder).expanduser()
    cfg = read_run_config(folder)
    if not (folder / "best.pt").is_file():
        raise RunError(f"{folder / 'best.pt'}: no checkpoint in this run folder (best.pt is written when the first "
                       f"epoch ends); finish the training (rerun the same endoarss-train command: it resumes) or "
                       f"pass a finished run folder")
    if data_root is None:
        if dataset is not None and dataset != cfg.dataset:
            raise ConfigError(f"--dataset {dataset}: another dataset than the run's ({cfg.dataset!r}) needs "
                              f"--data-root, the folder of that dataset")
        if image_size is not None and image_size != cfg.image_size:
            raise ConfigError(f"--image-size {image_size}: the run's own data are read at its image_size "
                              f"{cfg.image_size}; another size needs --data-root")
        data = make_datasets(cfg, splits=(split,))[split]
        ev = evaluate_run(folder, split, device=device, distances=distances, batch_size=batch_size)
        recorded = (json.loads((folder / "result.json").read_text()).get("data_fingerprint") or {}
                    if (folder / "result.json").is_file() else {})
        same = None if split not in recorded else recorded[split] == data.fingerprint()
        spec, where = data.spec, "the run's own data"
    else:
        if split not in ("train", "test"):
            raise ConfigError(f"--split {split}: another dataset is evaluated on its train or test split on disk")
        root = Path(data_root).expanduser()
        data = MTLDataset(root, split, dataset=dataset or cfg.dataset, image_size=image_size or cfg.image_size,
                          normalize=cfg.input_normalization(), ignore_index=cfg.ignore_index)
        model_counts = {t: cfg.model.classes_of(t) for t in cfg.tasks}
        data_counts = {t: get_task(t).num_classes(data.spec) for t in cfg.tasks}
        if model_counts != data_counts:
            raise ConfigError(f"--dataset {data.spec.name}: the run's model predicts {model_counts} classes per "
                              f"task, the dataset has {data_counts}; a run is evaluated on datasets of its own "
                              f"class space (e.g. a mtlendovis run on mtlendovis_gen)")
        ev = evaluate_run_on(folder, root, dataset or cfg.dataset, image_size, split=split, device=device,
                             batch_size=batch_size, distances=distances)
        spec, where, same = data.spec, str(root), None
    metrics = {f"{split}_{k}": v for k, v in ev.items() if isinstance(v, float)}
    per_class = {f"{split}_{k}": v for k, v in ev.items() if isinstance(v, list)}
    torch_device = resolve_device(device)
    return ResultRow.with_provenance(
        torch_device, source="evaluate", dataset=spec.name, data="synthetic" if data.synthetic else "real",
        **_run_fields(folder, cfg), image_size=data.image_size, compat_eval_size=COMPAT_SIZE, metrics=metrics,
        wall_time_s=round(time.perf_counter() - start, 2), peak_memory_mib=round(_peak_memory_mib(torch_device), 1),
        peak_memory_kind="cuda max allocated" if torch_device.type == "cuda" else "process peak RSS",
        deterministic=torch.are_deterministic_algorithms_enabled(), data_fingerprint={split: data.fingerprint()},
        run_dir=str(folder),
        extra={"model_source": "run folder", "checkpoint": str(folder / "best.pt"), "split": split,
               "evaluated_on": where, "data_root": str(data.root), "n_images": len(data),
               "same_data_as_run": same, **per_class}).to_dict()


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
    src.add_argument("--run", metavar="RUN_DIR", help="a run folder of ours (config.json + best.pt); evaluated on "
                                                      "its own data unless --data-root")
    src.add_argument("--released", metavar="CHECKPOINT", help="the authors' .pt file (loaded strictly)")
    src.add_argument("--random-init", action="store_true", help="no checkpoint: the released architecture with "
                                                                "random weights (labelled as such)")
    p.add_argument("--data-root", help="dataset root holding test/<activity>/image|mask (required with --released "
                                       "and --random-init; with --run: evaluate on this dataset instead of the run's)")
    p.add_argument("--dataset", default=None, help="registry name: mtlesd | mtlendovis | mtlendovis_gen | ... "
                                                   "(default: mtlesd; with --run the run's dataset)")
    p.add_argument("--image-size", type=int, default=None, help="evaluation resolution (default: released 244; "
                                                                "with --run the run's image_size)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="--run only: the split to evaluate (default test)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (--run: 8)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--id-map", default="released", help="mask ids: released (default: raw k -> k-1, as the "
                                                         "checkpoints were trained) | identity | spec | a JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights")
    p.add_argument("--amp", default="off", choices=("off", "auto", "bf16"), help="autocast (default fp32)")
    p.add_argument("--no-distances", action="store_true", help="skip HD / HD95 / SSIM (faster)")
    p.add_argument("--arch", action="append", type=_arch_option, default=[], metavar="KEY=VALUE",
                   help="released-architecture override for test-size files only (e.g. depth=2 embed_dim=32); "
                        "the default is the released ViT-B/14")
    p.add_argument("--out", help="write the result row as JSON here (--run: default evaluate_<dataset>_<split>.json "
                                 "in the run folder)")
    p.add_argument("--progress", action="store_true")
    return p


def main(argv=None) -> int:
    """Entry point; prints the result row as JSON; returns the exit status: 0, 1 (the checkpoint, the data or a file
    cannot be used; the message names it) or 2 (a bad option: unknown dataset, id map, architecture option, or a
    checkpoint that does not fit the dataset). ``--debug`` shows tracebacks."""
    args = _parser().parse_args(argv)
    with showing_progress("info"):  # the package's log lines (device chosen, warnings) on stderr
        return run_command(lambda: _run(args), debug=args.debug,
                           failures=(WeightsError, DataError, RunError, CheckpointMismatch, FileNotFoundError,
                                     OSError),
                           usage=(ValueError, TypeError))


def _run(args) -> int:
    if args.run is not None:
        return _run_folder(args)
    if args.data_root is None:
        raise ConfigError(f"--data-root is required with {'--released' if args.released else '--random-init'}: the "
                          f"dataset root holding test/<activity>/image|mask")
    if args.split != "test":
        raise ConfigError(f"--split {args.split}: the released checkpoint is evaluated on the test split only")
    checkpoint = None if args.released is None else Path(args.released).expanduser()
    row = evaluate_released(checkpoint, Path(args.data_root).expanduser(), args.dataset or "mtlesd",
                            image_size=args.image_size or 244,
                            device=args.device, batch_size=args.batch_size or 16, num_workers=args.workers,
                            id_map=_id_map(args.id_map), random_init=args.random_init, seed=args.seed,
                            distances=not args.no_distances, amp=args.amp, arch=dict(args.arch),
                            progress=args.progress)
    if args.out:
        write_json_atomic(Path(args.out).expanduser(), row)
    print(json.dumps(row, indent=2, default=str))
    return 0


def _run_folder(args) -> int:
    folder = Path(args.run).expanduser()
    if args.arch or args.id_map != "released" or args.seed != 0 or args.workers != 0:
        raise ConfigError("--arch, --id-map, --seed and --workers apply to --released / --random-init only; a run "
                          "folder is rebuilt from its own config.json")
    row = evaluate_run_folder(folder, None if args.data_root is None else Path(args.data_root).expanduser(),
                              args.dataset, split=args.split, image_size=args.image_size, device=args.device,
                              batch_size=args.batch_size or 8, distances=not args.no_distances)
    out = Path(args.out).expanduser() if args.out else folder / f"evaluate_{row['dataset']}_{args.split}.json"
    write_json_atomic(out, row)
    print(json.dumps(row, indent=2, default=str))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
