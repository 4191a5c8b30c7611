"""Dataset registry: what each real dataset and each synthetic preset is (paper Table I), as data.

A spec holds the activity names (folder ``k`` holds activity ``k - 1``), the segmentation class names (index 0 is
background), which of them are surgical instruments (instrument presence is derived from the masks), the raw-to-train
mask id map, and which ids are evaluated. Synthetic presets share their real dataset's
class counts and id space, so one loader and one model serve both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

__all__ = ["DatasetSpec", "DATASETS", "get_spec", "list_datasets", "identity_id_map", "released_id_map",
           "resolve_id_map"]


def identity_id_map(num_classes: int) -> Mapping[int, int]:
    """Raw mask value ``k`` is train id ``k`` for ``k < num_classes``."""
    return MappingProxyType({k: k for k in range(num_classes)})


def released_id_map(num_classes: int) -> Mapping[int, int]:
    """The authors' released mapping: raw ``k >= 1`` becomes ``k - 1``, so raw 0 and raw 1 both become background."""
    return MappingProxyType({0: 0, **{k: k - 1 for k in range(1, num_classes + 1)}})


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: names, id spaces and what is evaluated."""

    name: str
    activities: tuple[str, ...]
    seg_classes: tuple[str, ...]  # index 0 is background
    raw_to_train: Mapping[int, int]
    synthetic: bool = False
    real_counterpart: str | None = None  # for a synthetic preset: the real dataset whose id space it shares
    eval_activities: tuple[int, ...] | None = None  # None: all
    eval_seg_classes: tuple[int, ...] | None = None  # None: all (background included)
    split_sizes: Mapping[str, int] = field(default_factory=dict)  # paper Table I (real sets)
    train_on: str | None = None  # evaluation-only sets name the dataset a model is trained on
    notes: str = ""
    instrument_classes: tuple[int, ...] | None = None  # seg class ids that are instruments (None: not known)

    @property
    def num_activities(self) -> int:
        return len(self.activities)

    @property
    def num_seg_classes(self) -> int:
        return len(self.seg_classes)

    @property
    def num_instruments(self) -> int | None:
        """Instrument classes (the ``presence`` task's labels, in ``instrument_classes`` order); None if unknown."""
        return None if self.instrument_classes is None else len(self.instrument_classes)

    @property
    def activity_folders(self) -> tuple[str, ...]:
        """Folder names of the activities: ``'1'`` ... ``'K'``."""
        return tuple(str(k + 1) for k in range(self.num_activities))


_MTLESD_ACTIVITIES = ("marking", "injection", "submucosal_dissection")
# The paper names the six MTLESD segmentation categories only in its Fig. 1(a) (not in the text we have): generic
# names until a dataset's own class list is known. Override with a `classes.json` beside the data if you have one.
_MTLESD_CLASSES = ("background",) + tuple(f"esd_class_{k}" for k in range(1, 7))

_ENDOVIS_ACTIVITIES = ("cauterization", "clipping", "cutting", "grasping", "idle", "looping", "manipulation",
                       "retraction", "stapling", "suction", "suturing", "ultrasound_sensing")
# Order as listed in the paper, Sec. IV-A.
_ENDOVIS_CLASSES = ("background", "bipolar_forceps", "large_needle_driver", "prograsp_forceps", "ultrasound_probe",
                    "suction_instrument", "monopolar_curved_scissors", "clip_applier")
# EndoVis-17 shares five instrument types with the seven above (the paper's "5 segmentation classes").
_GEN_CLASSES = (0, 1, 2, 3, 4, 6)
_ENDOVIS_INSTRUMENTS = tuple(range(1, len(_ENDOVIS_CLASSES)))  # every class but background is an instrument type

# Synthetic ESD scene: the needle and the knife are both thin metallic shafts (a look-alike pair) that the activity
# (injection bleb vs dissection cut) tells apart.
_SYN_ESD_CLASSES = ("background", "marking_spot", "injection_needle", "electrosurgical_knife", "fluid_bleb",
                    "exposed_submucosa", "bleeding")
_SYN_ESD_INSTRUMENTS = (_SYN_ESD_CLASSES.index("injection_needle"), _SYN_ESD_CLASSES.index("electrosurgical_knife"))

_SYN_GEN_ACTIVITIES = (0, 2, 3, 6, 7, 11)  # six of the twelve MTLEndovis activities

DATASETS: Mapping[str, DatasetSpec] = MappingProxyType({
    "mtlesd": DatasetSpec(
        name="mtlesd", activities=_MTLESD_ACTIVITIES, seg_classes=_MTLESD_CLASSES,
        raw_to_train=identity_id_map(len(_MTLESD_CLASSES)), split_sizes={"train": 1618, "test": 402},
        instrument_classes=None,  # the six categories are unnamed here: which are instruments is not known
        notes="Porcine ESD (DREAMS system), 1306x1009 crops; from the authors only."),
    "mtlendovis": DatasetSpec(
        name="mtlendovis", activities=_ENDOVIS_ACTIVITIES, seg_classes=_ENDOVIS_CLASSES,
        raw_to_train=identity_id_map(len(_ENDOVIS_CLASSES)), split_sizes={"train": 1601, "test": 395},
        instrument_classes=_ENDOVIS_INSTRUMENTS,
        notes="EndoVis-18 frames and instrument-type masks, activities from EndoVis-18-VQLA-Extend."),
    "mtlendovis_gen": DatasetSpec(
        name="mtlendovis_gen", activities=_ENDOVIS_ACTIVITIES, seg_classes=_ENDOVIS_CLASSES,
        raw_to_train=identity_id_map(len(_ENDOVIS_CLASSES)), eval_activities=None, eval_seg_classes=_GEN_CLASSES,
        split_sizes={"train": 0, "test": 97}, train_on="mtlendovis", instrument_classes=_ENDOVIS_INSTRUMENTS,
        notes="EndoVis-17 frames in MTLEndovis's id space; evaluation only. Six activities (those present in the "
              "test split are evaluated) and five instrument classes."),
    "synthetic_mtlesd": DatasetSpec(
        name="synthetic_mtlesd", activities=_MTLESD_ACTIVITIES, seg_classes=_SYN_ESD_CLASSES,
        raw_to_train=identity_id_map(len(_SYN_ESD_CLASSES)), synthetic=True, real_counterpart="mtlesd",
        instrument_classes=_SYN_ESD_INSTRUMENTS,
        notes="Synthetic ESD-like scenes; injection_needle and electrosurgical_knife look alike."),
    "synthetic_mtlendovis": DatasetSpec(
        name="synthetic_mtlendovis", activities=_ENDOVIS_ACTIVITIES, seg_classes=_ENDOVIS_CLASSES,
        raw_to_train=identity_id_map(len(_ENDOVIS_CLASSES)), synthetic=True, real_counterpart="mtlendovis",
        instrument_classes=_ENDOVIS_INSTRUMENTS,
        notes="Synthetic robotic scenes with long-tailed activities."),
    "synthetic_mtlendovis_gen": DatasetSpec(
        name="synthetic_mtlendovis_gen", activities=_ENDOVIS_ACTIVITIES, seg_classes=_ENDOVIS_CLASSES,
        raw_to_train=identity_id_map(len(_ENDOVIS_CLASSES)), synthetic=True, real_counterpart="mtlendovis_gen",
        eval_activities=_SYN_GEN_ACTIVITIES, eval_seg_classes=_GEN_CLASSES, train_on="synthetic_mtlendovis",
        instrument_classes=_ENDOVIS_INSTRUMENTS,
        notes="Domain-shifted synthetic robotic scenes (colour, texture, lighting); a subset of classes."),
})

# `make_synthetic(preset="mtlesd")` names the real dataset; these are the registry entries it writes.
SYNTHETIC_PRESETS: Mapping[str, str] = MappingProxyType({
    "mtlesd": "synthetic_mtlesd", "mtlendovis": "synthetic_mtlendovis", "mtlendovis_gen": "synthetic_mtlendovis_gen"})


def list_datasets() -> list[str]:
    """Names of every registered dataset."""
    return sorted(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset, or a ValueError listing the valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"dataset={name!r} is not registered; expected one of {list_datasets()}") from None


def resolve_id_map(spec: DatasetSpec, id_map: str | Mapping[int, int] | None,
                   ignore_index: int | None = None) -> Mapping[int, int]:
    """The raw-to-train map to use: the spec's (``None``), ``'identity'``, ``'released'`` or an explicit mapping
    (whose train ids are class ids, or ``ignore_index``: raw values mapped to it are ignored)."""
    if id_map is None:
        return spec.raw_to_train
    if id_map == "identity":
        return identity_id_map(spec.num_seg_classes)
    if id_map == "released":
        return released_id_map(spec.num_seg_classes)
    if isinstance(id_map, Mapping):
        bad = {k: v for k, v in id_map.items()
               if not (0 <= int(v) < spec.num_seg_classes or (ignore_index is not None and int(v) == ignore_index))}
        if bad:
            also = f" (or ignore_index={ignore_index}, for pixels to ignore)" if ignore_index is not None else ""
            raise ValueError(f"id_map maps to train ids outside 0..{spec.num_seg_classes - 1}{also} for dataset "
                             f"{spec.name!r}: {bad}")
        return MappingProxyType({int(k): int(v) for k, v in id_map.items()})
    raise ValueError(f"id_map={id_map!r}: expected None, 'identity', 'released' or a dict raw -> train id")
