"""Prepare real data: validate the authors' folders, convert EndoVis-18 / EndoVis-17 downloads into the layout.

Nothing here downloads anything: run ``python -m endoarss_lib.data.prepare sources`` for where the files come from.

    python -m endoarss_lib.data.prepare validate /data/MTLESD --dataset mtlesd
    python -m endoarss_lib.data.prepare endovis18 --frames ... --type-masks ... --vqla ... --out /data/MTLEndovis
    python -m endoarss_lib.data.prepare endovis17 --frames ... --type-masks ... --vqla ... --out /data/MTLEndovis-Gen
    python -m endoarss_lib.data.prepare colour-masks /data/raw --palette palette.json --out /data/indexed
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from ..atomic import write_json_atomic
from ..cli import add_standard_options, prog, run_command, say
from .dataset import CARD_NAME, ID_MAP_NAME, read_id_map, resolve_spec, root_id_map, scan_split, stratified_split
from .io import DataError, image_size_of, map_mask_ids, read_image, read_index_mask, shown_path
from .registry import DatasetSpec, get_spec

__all__ = ["ValidationReport", "validate", "convert_endovis18", "convert_endovis17", "convert_colour_masks",
           "parse_vqla_label", "frame_activity", "SOURCES", "main"]

CONVERTER_VERSION = "1"

SOURCES = """\
Where the data come from (none of it may be redistributed; this project never downloads it):
- MTLESD and MTLEndovis (the authors' prepared folders): from the EndoARSS authors (the paper's data link). Check
  them with:  python -m endoarss_lib.data.prepare validate ROOT --dataset mtlesd|mtlendovis
- EndoVis-18 (frames): MICCAI 2018 Robotic Scene Segmentation challenge (https://endovissub2018-roboticscenesegmentation.grand-challenge.org/), after registration.
- EndoVis-18 instrument-type masks: the ISINet instrument-type annotations for EndoVis-18 (Gonzalez et al., MICCAI 2020).
- EndoVis-17 (frames, type masks): MICCAI 2017 Robotic Instrument Segmentation challenge, after registration.
- Activity labels: EndoVis-18-VQLA-Extend and EndoVis-17-VQLA-Extend (Bai et al.), per-frame label .txt files.
"""

# Source instrument-type ids -> MTLEndovis train ids (registry order: 1 bipolar_forceps, 2 large_needle_driver,
# 3 prograsp_forceps, 4 ultrasound_probe, 5 suction_instrument, 6 monopolar_curved_scissors, 7 clip_applier).
# ISINet's EndoVis-18 type order: 1 bipolar, 2 prograsp, 3 large needle driver, 4 monopolar curved scissors,
# 5 ultrasound probe, 6 suction, 7 clip applier.
ENDOVIS18_TYPE_TO_TRAIN: Mapping[int, int] = {0: 0, 1: 1, 2: 3, 3: 2, 4: 6, 5: 4, 6: 5, 7: 7}
# EndoVis-17 type order: 1 bipolar, 2 prograsp, 3 large needle driver, 4 vessel sealer, 5 grasping retractor,
# 6 monopolar curved scissors, 7 other (the ultrasound probe). Vessel sealer and grasping retractor have no
# MTLEndovis class: None means "refuse unless --unmapped background".
ENDOVIS17_TYPE_TO_TRAIN: Mapping[int, int | None] = {0: 0, 1: 1, 2: 3, 3: 2, 4: None, 5: None, 6: 6, 7: 4}

# VQLA-Extend answers -> MTLEndovis activity names.
_ANSWER_ALIASES = {"tissue_manipulation": "manipulation", "ultrasound_sensing": "ultrasound_sensing",
                   "ultrasound": "ultrasound_sensing", "cauterisation": "cauterization"}
_STATE_QUESTION = re.compile(r"what is the state of (.+?)\??$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------- validation

@dataclass
class ValidationReport:
    """What ``validate`` found: problems (errors), warnings, counts and the raw mask values seen."""

    root: str
    dataset: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    raw_values: dict = field(default_factory=dict)
    image_sizes: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """A human-readable report."""
        lines = [f"{self.dataset} at {self.root}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}"]
        for split, per in self.counts.items():
            lines.append(f"  {split}: {sum(per.values())} images  " + ", ".join(f"{k}={v}" for k, v in per.items()))
        lines.append(f"  raw mask values (pixels): {self.raw_values}")
        lines.append(f"  image sizes (WxH: count): {self.image_sizes}")
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


def validate(root: str | Path, dataset: str, id_map=None, write_index: bool = True,
             ignore_index: int = 255) -> ValidationReport:
    """Check every split, file, size, mask mode and mask id of a dataset folder; collect all problems in one pass.

    The rules are the ones training applies (:class:`~endoarss_lib.data.MTLDataset`): the dataset card and an
    ``id_map.json`` beside the data are read, the folder layout is checked by the same scan, and every image and
    mask is decoded in full (a truncated file is found here, not mid-epoch). Masks must be lossless (a JPEG under a
    ``.png`` name is found by its header); raw values equal to ``ignore_index`` are ignored pixels (counted and
    reported); an id map that merges raw values present in the masks is reported (a problem when
    ``id_map='released'`` meets masks that look 0-based: raw 0 and 1 would become one class).
    """
    root = Path(root)
    report = ValidationReport(str(root), dataset)
    try:
        spec, _ = resolve_spec(root, dataset)
    except ValueError as exc:  # DataError (the card) or an unregistered dataset
        report.problems.append(str(exc))
        return report
    try:
        mapping = root_id_map(root, spec, id_map, ignore_index)
    except ValueError as exc:
        report.problems.append(str(exc))
        return report
    if id_map is None and (root / ID_MAP_NAME).is_file():
        report.warnings.append(f"mask ids are read through {root / ID_MAP_NAME} (as training reads them)")
    raw_counts: Counter = Counter()
    sizes: Counter = Counter()
    ignored_masks: list[str] = []
    index = []
    for split in [s for s in ("train", "test") if not (spec.train_on and s == "train")]:
        samples, problems, notes = scan_split(root, split, spec)
        report.problems += problems
        report.warnings += notes
        report.counts[split] = {spec.activities[k]: n for k, n in sorted(Counter(s.label for s in samples).items())}
        expected = spec.split_sizes.get(split)
        if expected and len(samples) != expected:
            report.warnings.append(f"{split}: {len(samples)} images, the paper's Table I has {expected}")
        for sample in samples:
            entry = _check_sample(sample, mapping, report, raw_counts, sizes, ignore_index, ignored_masks)
            if entry:
                index.append({"split": split, **entry})
    report.raw_values = {int(k): int(v) for k, v in sorted(raw_counts.items())}
    report.image_sizes = {f"{w}x{h}": n for (w, h), n in sizes.most_common()}
    _suggest_id_map(spec, report, uses_file=id_map is None and (root / ID_MAP_NAME).is_file())
    _check_ignored(report, mapping, ignore_index, ignored_masks)
    _check_merges(spec, report, mapping, id_map, ignore_index)
    if write_index and report.ok:
        write_json_atomic(root / "index.json", {"dataset": dataset, "converter_version": CONVERTER_VERSION,
                                                "samples": index})
    return report


def _decoded(read, path: Path, report: ValidationReport):
    """``read(path)``, or None with the problem recorded (an unforeseen failure too: the report goes on)."""
    try:
        return read(path)
    except DataError as exc:
        report.problems.append(str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. MemoryError on a huge file: one problem, not a dead report
        report.problems.append(f"{shown_path(path)}: cannot be read ({type(exc).__name__}: {exc})")
    return None


def _check_sample(sample, mapping, report, raw_counts, sizes, ignore_index=None, ignored_masks=None) -> dict | None:
    """Decode the sample's image and mask in full (as the loader does) and check sizes and mask ids."""
    image, raw = _decoded(read_image, sample.image, report), _decoded(read_index_mask, sample.mask, report)
    if image is None or raw is None:
        return None
    size = (image.shape[1], image.shape[0])
    sizes[size] += 1
    if raw.shape[::-1] != size:
        report.problems.append(f"{sample.mask}: mask size {raw.shape[1]}x{raw.shape[0]} differs from its image "
                               f"{sample.image} ({size[0]}x{size[1]})")
        return None
    values, counts = np.unique(raw, return_counts=True)
    raw_counts.update(dict(zip(values.tolist(), counts.tolist())))
    if ignored_masks is not None and ignore_index is not None and ignore_index not in mapping and \
            ignore_index in values:
        ignored_masks.append(str(sample.mask))
    try:
        map_mask_ids(raw, mapping, sample.mask, ignore_index)
    except DataError as exc:
        report.problems.append(str(exc))
        return None
    return {"image": str(sample.image), "mask": str(sample.mask), "label": sample.label, "size": list(size)}


def _check_ignored(report: ValidationReport, mapping, ignore_index: int, ignored_masks: list[str]) -> None:
    """Pixels whose raw value is ``ignore_index`` count in no loss or metric: say how many; masks that hold nothing
    else than background and that value are binary masks (0/255), whose foreground would be ignored: a problem."""
    pixels = report.raw_values.get(ignore_index, 0)
    if not pixels or ignore_index in mapping:
        return
    share = pixels / max(sum(report.raw_values.values()), 1)
    report.warnings.append(f"{pixels} pixels ({share:.1%}) in {len(ignored_masks)} mask(s) have value {ignore_index} "
                           f"= ignore_index: no loss or metric counts them (e.g. {ignored_masks[0]})")
    if set(report.raw_values) <= {0, ignore_index}:
        report.problems.append(
            f"every mask holds only 0 and {ignore_index}: binary (0/{ignore_index}) masks? Their foreground would be "
            f"ignored, not learned. Map {ignore_index} to its class with an {ID_MAP_NAME} beside the data "
            f"({{\"raw_to_train\": {{\"0\": 0, \"{ignore_index}\": <class id>}}}}); if {ignore_index} really marks "
            f"pixels to ignore, the masks hold no class to learn")


def _check_merges(spec: DatasetSpec, report: ValidationReport, mapping, id_map, ignore_index: int) -> None:
    """Raw values present in the masks that the id map sends to one train id: reported with their pixel counts; a
    problem when ``id_map='released'`` (raw k -> k-1) meets masks that look 0-based (raw 0 present, nothing above
    S-1): raw 0 and 1 would become one class and the last class would never be seen."""
    present = {v: n for v, n in report.raw_values.items() if v in mapping and v != ignore_index}
    by_train: dict = {}
    for value in present:
        by_train.setdefault(mapping[value], []).append(value)
    merged = {t: vs for t, vs in by_train.items() if len(vs) > 1}
    if not merged:
        return
    words = "; ".join(f"raw {', '.join(map(str, vs))} ({', '.join(f'{present[v]} px' for v in vs)}) -> train id {t}"
                      for t, vs in sorted(merged.items()))
    zero_based = 0 in present and max(report.raw_values) <= spec.num_seg_classes - 1
    if id_map == "released" and zero_based:
        report.problems.append(
            f"id_map='released' (raw k -> k-1) on masks that look 0-based (raw values {sorted(report.raw_values)}, "
            f"none above {spec.num_seg_classes - 1}): {words}, so two classes would merge and class "
            f"{spec.num_seg_classes - 1} would never be seen. Validate and train with id_map=identity (or leave id_map "
            f"out) for 0-based masks; 'released' is for the authors' 1-based masks")
    else:
        report.warnings.append(f"the id map merges raw values present in the masks: {words}; make sure this is "
                               f"meant (the released map sends raw 0 and 1 both to background)")


def _suggest_id_map(spec: DatasetSpec, report: ValidationReport, uses_file: bool = False) -> None:
    values = set(report.raw_values)
    if not uses_file and values and min(values) >= 1 and max(values) == spec.num_seg_classes:
        report.warnings.append(f"raw mask values run 1..{spec.num_seg_classes}: the masks may be 1-based; "
                               f"consider id_map='released' (raw k -> k-1) or an {ID_MAP_NAME} beside the data: "
                               f"{{\"raw_to_train\": {{\"1\": 0, \"2\": 1, ...}}}}")


# ---------------------------------------------------------------------------------------------------- VQLA labels

def parse_vqla_label(path: str | Path) -> dict[str, str]:
    """Instrument -> state answers from one VQLA(-Extend) label file (lines ``question|answer[|extra...]``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read label file ({exc})") from None
    states = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 2:
            raise DataError(f"{path}:{number}: expected 'question|answer', got {line!r}")
        match = _STATE_QUESTION.match(parts[0])
        if match:
            states[match.group(1).strip().lower()] = parts[1]
    return states


def _activity_name(answer: str, where: str) -> str:
    name = answer.strip().lower().replace(" ", "_").replace("-", "_")
    name = _ANSWER_ALIASES.get(name, name)
    endovis = get_spec("mtlendovis")
    if name not in endovis.activities:
        raise DataError(f"{where}: answer {answer!r} is not one of the 12 MTLEndovis activities {endovis.activities}")
    return name


def frame_activity(states: Mapping[str, str], where: str) -> str:
    """One activity per frame: the most frequent non-idle instrument state (ties: alphabetical); else 'idle'.

    The paper says only that activities were derived "from the actions of surgical instruments in each frame"; this
    is our explicit rule, recorded in the dataset card.
    """
    if not states:
        raise DataError(f"{where}: no 'What is the state of <instrument>?' answer in this label file")
    names = [_activity_name(a, where) for a in states.values()]
    busy = Counter(n for n in names if n != "idle")
    if not busy:
        return "idle"
    top = max(busy.values())
    return sorted(n for n, c in busy.items() if c == top)[0]


# ---------------------------------------------------------------------------------------------------- conversion

@dataclass(frozen=True)
class _Frame:
    image: Path
    mask: Path
    label_file: Path
    name: str


def _find_frames(frames_root: Path, masks_root: Path, vqla_root: Path, sequence_glob: str,
                 frame_subdir: str, label_subdir: str) -> list[_Frame]:
    """Frames that have a VQLA label file; each needs its image and its type mask (errors name what is missing)."""
    for what, path in (("--frames", frames_root), ("--type-masks", masks_root), ("--vqla", vqla_root)):
        if not path.is_dir():
            raise DataError(f"{what} {path}: folder does not exist")
    sequences = sorted(p for p in vqla_root.glob(sequence_glob) if p.is_dir())
    if not sequences:
        raise DataError(f"--vqla {vqla_root}: no sequence folders matching {sequence_glob!r}")
    frames, missing = [], []
    for seq in sequences:
        labels = sorted((seq / label_subdir).glob("*.txt"))
        if not labels:
            raise DataError(f"{seq / label_subdir}: no label .txt files")
        for label in labels:
            image = frames_root / seq.name / frame_subdir / f"{label.stem}.png"
            mask = masks_root / seq.name / f"{label.stem}.png"
            missing += [str(p) for p in (image, mask) if not p.is_file()]
            frames.append(_Frame(image, mask, label, f"{seq.name}_{label.stem}"))
    if missing:
        raise DataError(f"{len(missing)} file(s) expected beside the VQLA labels are missing: {missing[:5]}")
    return frames


def _remap(raw: np.ndarray, source_map: Mapping[int, int | None], unmapped: str, path: Path,
           dropped: Counter) -> np.ndarray:
    out = np.zeros_like(raw)
    for value in np.unique(raw).tolist():
        if value not in source_map:
            raise DataError(f"{path}: mask value {value} is not a known source class {sorted(source_map)}")
        target = source_map[value]
        if target is None:
            if unmapped != "background":
                raise DataError(f"{path}: source class {value} has no MTLEndovis class; pass --unmapped background "
                                f"to map it to background (counted in the card)")
            dropped[value] += int((raw == value).sum())
            target = 0
        out[raw == value] = target
    return out


def _write_layout(frames: Sequence[_Frame], activities: Sequence[str], splits: Sequence[str], out: Path,
                  spec: DatasetSpec, source_map, unmapped: str, card: dict) -> Path:
    """Write images and remapped masks into ``out`` (built in a temporary folder, then renamed into place)."""
    if out.exists():
        raise DataError(f"--out {out}: already exists (left as it is); choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    dropped: Counter = Counter()
    try:
        counts: dict = {}
        for frame, activity, split in zip(frames, activities, splits):
            folder = tmp / split / str(spec.activities.index(activity) + 1)
            (folder / "image").mkdir(parents=True, exist_ok=True)
            (folder / "mask").mkdir(parents=True, exist_ok=True)
            mask = _remap(read_index_mask(frame.mask), source_map, unmapped, frame.mask, dropped)
            if mask.shape[::-1] != image_size_of(frame.image):
                raise DataError(f"{frame.mask}: size differs from its frame {frame.image}")
            shutil.copyfile(frame.image, folder / "image" / f"{frame.name}.png")
            Image.fromarray(mask.astype(np.uint8), mode="L").save(folder / "mask" / f"{frame.name}.png")
            counts.setdefault(split, Counter())[activity] += 1
        card = {**card, "dataset": spec.name, "synthetic": False, "converter_version": CONVERTER_VERSION,
                "counts": {s: dict(sorted(c.items())) for s, c in counts.items()},
                "unmapped_pixels_to_background": {int(k): v for k, v in dropped.items()}}
        write_json_atomic(tmp / CARD_NAME, card)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_endovis18(frames: str | Path, type_masks: str | Path, vqla: str | Path, out: str | Path,
                      test_fraction: float = 0.2, seed: int = 0, source_map: Mapping[int, int] | None = None) -> Path:
    """EndoVis-18 frames + instrument-type masks + VQLA-Extend labels -> the MTLEndovis layout (seeded 4:1 split).

    Expected: ``frames/seq_<n>/left_frames/<frame>.png``, ``type_masks/seq_<n>/<frame>.png`` (index masks, ISINet
    type ids), ``vqla/seq_<n>/vqla/label/<frame>.txt``. Only frames with a label file are converted.
    """
    found = _find_frames(Path(frames), Path(type_masks), Path(vqla), "seq_*", "left_frames", "vqla/label")
    activities = [frame_activity(parse_vqla_label(f.label_file), str(f.label_file)) for f in found]
    spec = get_spec("mtlendovis")
    labels = [spec.activities.index(a) for a in activities]
    train_idx, _ = stratified_split(labels, test_fraction, seed)
    train = set(train_idx)
    splits = ["train" if i in train else "test" for i in range(len(found))]
    card = {"source": "EndoVis-18 + ISINet type masks + EndoVis-18-VQLA-Extend", "split_seed": seed,
            "test_fraction": test_fraction, "activity_rule": frame_activity.__doc__.splitlines()[0]}
    return _write_layout(found, activities, splits, Path(out), spec, source_map or ENDOVIS18_TYPE_TO_TRAIN,
                         "error", card)


def convert_endovis17(frames: str | Path, type_masks: str | Path, vqla: str | Path, out: str | Path,
                      unmapped: str = "error", source_map: Mapping[int, int | None] | None = None) -> Path:
    """EndoVis-17 frames + type masks + VQLA-Extend labels -> the MTLEndovis-Gen layout (test split only).

    Expected: ``frames/instrument_dataset_<n>/left_frames/<frame>.png``, ``type_masks/instrument_dataset_<n>/
    <frame>.png`` (EndoVis-17 type ids), ``vqla/instrument_dataset_<n>/vqla/label/<frame>.txt``.
    """
    if unmapped not in ("error", "background"):
        raise ValueError(f"unmapped={unmapped!r}: expected 'error' or 'background'")
    found = _find_frames(Path(frames), Path(type_masks), Path(vqla), "instrument_dataset_*", "left_frames",
                         "vqla/label")
    activities = [frame_activity(parse_vqla_label(f.label_file), str(f.label_file)) for f in found]
    card = {"source": "EndoVis-17 + type masks + EndoVis-17-VQLA-Extend", "unmapped": unmapped,
            "activity_rule": frame_activity.__doc__.splitlines()[0]}
    return _write_layout(found, activities, ["test"] * len(found), Path(out), get_spec("mtlendovis_gen"),
                         source_map or ENDOVIS17_TYPE_TO_TRAIN, unmapped, card)


def _read_palette(palette: Mapping | str | Path) -> dict[tuple[int, int, int], int]:
    """``{"R,G,B": id}`` (a dict or a JSON file) as ``{(r, g, b): id}``."""
    if not isinstance(palette, Mapping):
        path = Path(palette)
        try:
            palette = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"--palette {path}: expected a JSON object {{\"R,G,B\": id}} ({exc})") from None
    try:
        return {tuple(int(c) for c in str(k).split(",")): int(v) for k, v in palette.items()}
    except ValueError as exc:
        raise DataError(f"palette: keys must be 'R,G,B' and values ids ({exc})") from None


def convert_colour_masks(src: str | Path, palette: Mapping | str | Path, out: str | Path) -> Path:
    """Copy a layout whose masks are colour-coded into ``out`` with index masks, through an exact palette.

    A colour that is not in the palette is an error naming the file and the colours; nothing is guessed.
    """
    src, out = Path(src), Path(out)
    colours = _read_palette(palette)
    if not src.is_dir():
        raise DataError(f"{src}: folder does not exist")
    if out.exists():
        raise DataError(f"--out {out}: already exists (left as it is); choose a new folder")
    masks = sorted(src.glob("*/*/mask/*.png"))
    if not masks:
        raise DataError(f"{src}: no masks at <split>/<activity>/mask/*.png")
    keys = np.array([r << 16 | g << 8 | b for r, g, b in colours])
    ids = np.array(list(colours.values()), np.uint8)
    order = np.argsort(keys)
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=f".{out.name}."))
    try:
        shutil.copytree(src, tmp / "tree", ignore=shutil.ignore_patterns("mask"))
        for mask in masks:
            rgb = np.asarray(Image.open(mask).convert("RGB")).astype(np.int64)
            code = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
            pos = np.clip(np.searchsorted(keys[order], code), 0, len(keys) - 1)
            known = keys[order][pos] == code
            if not known.all():
                bad = sorted({tuple(int(c) for c in rgb[i, j]) for i, j in zip(*np.nonzero(~known))})[:8]
                raise DataError(f"{mask}: colours {bad} are not in the palette")
            target = tmp / "tree" / mask.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids[order][pos], mode="L").save(target)
        os.replace(tmp / "tree", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------- CLI

def _id_map_arg(value: str | None):
    if value is None or value in ("identity", "released"):
        return value
    path = Path(value)
    if not path.is_file():
        raise DataError(f"--id-map {value}: expected 'identity', 'released' or a JSON file")
    return read_id_map(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("endoarss_lib.data.prepare", "endoarss-prepare"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_standard_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sources", help="where each dataset comes from")
    v = sub.add_parser("validate", help="check an MTLESD / MTLEndovis / MTLEndovis-Gen folder and write index.json")
    v.add_argument("root")
    v.add_argument("--dataset", required=True)
    v.add_argument("--id-map", default=None, help="identity | released | a JSON file {raw_to_train: {...}}")
    v.add_argument("--no-index", action="store_true", help="do not write index.json")
    v.add_argument("--ignore-index", type=int, default=255,
                   help="mask value that marks pixels to ignore (as training's ignore_index; default 255)")
    c = sub.add_parser("colour-masks", help="copy a layout, turning colour-coded masks into index masks")
    c.add_argument("src")
    c.add_argument("--palette", required=True, help='JSON file {"R,G,B": class id, ...}')
    c.add_argument("--out", required=True)
    for name, help_ in (("endovis18", "EndoVis-18 + VQLA-Extend -> MTLEndovis"),
                        ("endovis17", "EndoVis-17 + VQLA-Extend -> MTLEndovis-Gen")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--frames", required=True)
        c.add_argument("--type-masks", required=True)
        c.add_argument("--vqla", required=True)
        c.add_argument("--out", required=True)
        if name == "endovis18":
            c.add_argument("--test-fraction", type=float, default=0.2)
            c.add_argument("--seed", type=int, default=0)
        else:
            c.add_argument("--unmapped", choices=("error", "background"), default="error")
    for sub_parser in sub.choices.values():  # --debug also after the command's name
        sub_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="show the full traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status: 0, 1 (validate found problems; or a file could not be
    read or written) or 2 (a bad argument, or a conversion refused: the message names the file). ``--debug`` shows
    tracebacks."""
    args = _parser().parse_args(argv)
    return run_command(lambda: _run(args), debug=args.debug, usage=(DataError, ValueError))


def _run(args) -> int:
    if args.command == "sources":
        print(SOURCES)
        return 0
    if args.command == "validate":
        report = validate(Path(args.root).expanduser(), args.dataset, _id_map_arg(args.id_map),
                          write_index=not args.no_index, ignore_index=args.ignore_index)
        say(report.format(), sys.stdout)
        return 0 if report.ok else 1
    if args.command == "colour-masks":
        out = convert_colour_masks(args.src, args.palette, args.out)
        print(f"wrote {out}; now run: python -m endoarss_lib.data.prepare validate {out} --dataset <name>")
        return 0
    if args.command == "endovis18":
        out = convert_endovis18(args.frames, args.type_masks, args.vqla, args.out, args.test_fraction, args.seed)
    else:
        out = convert_endovis17(args.frames, args.type_masks, args.vqla, args.out, args.unmapped)
    print(f"wrote {out}; now run: python -m endoarss_lib.data.prepare validate {out} --dataset "
          f"{'mtlendovis' if args.command == 'endovis18' else 'mtlendovis_gen'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
