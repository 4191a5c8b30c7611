"""The claims the collection tests, as data, and their verdicts computed from runs over seeds.

A :class:`Claim` says "``better`` beats ``worse`` on ``metric``" and where it comes from (the paper's table or
section, or a related paper, or this project's reading of the released code). ``better`` and ``worse`` name
:data:`~endoarss_lib.evidence.variants.VARIANTS` (configurations trained on the same data and seeds) or, for a claim
about one configuration under two conditions (``kind="conditions"``: in-domain vs shifted test set, clean vs
corrupted), the names of those two evaluations.

:func:`decide` turns the per-seed values (and, where the metric is a function of test images, the per-image
outcomes) into a :class:`Verdict`: per-seed paired differences, a seed interval and a bootstrap interval over test
images, and ``demonstrated`` / ``reversed`` / ``inconclusive`` (:mod:`.stats`). :func:`sentence` is the only place
that words a verdict; a notebook prints it and never words a comparison itself. At the ``test`` scale nothing is
decided: every verdict is ``not decided (test scale)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .outcomes import OutcomeKeyError, outcome_higher_is_better, outcome_value
from .stats import LEVEL, N_BOOTSTRAP, bootstrap_interval, t_interval, verdict

__all__ = ["Claim", "Verdict", "CLAIMS", "claims_for", "get_claim", "decide", "sentence", "NOT_DECIDED",
           "metric_label", "claims_frame"]

NOT_DECIDED = "not decided (test scale)"


@dataclass(frozen=True)
class Claim:
    """One tested statement: ``better`` beats ``worse`` on ``metric`` (direction from the metric)."""

    id: str
    notebook: str
    statement: str
    source: str
    better: str
    worse: str
    metric: str  # a result key without the split (cls_accuracy, seg_miou_fg, seg_iou_<class>, seg_swap_<a>__<b>)
    kind: str = "variants"  # "variants": two configurations, paired by seed; "conditions": one configuration twice
    per_image: bool = True  # False: the metric is not a function of test images (seed interval alone)
    higher_is_better: bool | None = None  # None: from the metric (outcome_higher_is_better)

    @property
    def higher(self) -> bool:
        return outcome_higher_is_better(self.metric) if self.higher_is_better is None else self.higher_is_better


@dataclass
class Verdict:
    """A claim's decision: values, per-seed differences (signed: positive = the claimed direction), intervals."""

    claim: Claim
    scale: str
    seeds: list[int] = field(default_factory=list)
    better_values: list[float] = field(default_factory=list)
    worse_values: list[float] = field(default_factory=list)
    differences: list[float] = field(default_factory=list)
    mean_difference: float = float("nan")
    seed_low: float = float("nan")
    seed_high: float = float("nan")
    boot_low: float = float("nan")
    boot_high: float = float("nan")
    verdict: str = NOT_DECIDED

    def row(self) -> dict:
        """One row of ``claims.csv``."""
        c = self.claim
        return {"claim": c.id, "notebook": c.notebook, "statement": c.statement, "source": c.source,
                "better": c.better, "worse": c.worse, "metric": c.metric, "higher_is_better": c.higher,
                "n_seeds": len(self.seeds), "seeds": " ".join(map(str, self.seeds)),
                "better_mean": _mean(self.better_values), "worse_mean": _mean(self.worse_values),
                "differences": " ".join(f"{d:+.4f}" for d in self.differences),
                "mean_difference": self.mean_difference, "seed_low": self.seed_low, "seed_high": self.seed_high,
                "boot_low": self.boot_low, "boot_high": self.boot_high,
                "interval": _interval_text(self), "verdict": self.verdict, "scale": self.scale}


def _mean(values: Sequence[float]) -> float:
    v = [x for x in values if np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _interval_text(v: Verdict) -> str:
    parts = []
    if np.isfinite(v.seed_low):
        parts.append(f"seeds [{v.seed_low:+.3f}, {v.seed_high:+.3f}]")
    if np.isfinite(v.boot_low):
        parts.append(f"test images [{v.boot_low:+.3f}, {v.boot_high:+.3f}]")
    return "; ".join(parts) if parts else "-"


_LABELS = {"cls_accuracy": "activity accuracy", "cls_macro_f1": "activity macro F1", "seg_miou": "mIoU",
           "seg_miou_fg": "foreground mIoU", "seg_dice": "mean Dice", "recall_tail": "tail-activity recall",
           "mean_cosine": "mean task-gradient cosine", "seg_miou_eval": "mIoU over the shifted set's classes"}


def metric_label(metric: str) -> str:
    """Words for a claim metric (``seg_swap_a__b`` -> "swap rate a / b")."""
    if metric in _LABELS:
        return _LABELS[metric]
    for prefix, words in (("seg_swap_", "swap rate"), ("seg_pair_iou_", "mean IoU of"), ("seg_iou_", "IoU of")):
        if metric.startswith(prefix):
            return f"{words} {metric[len(prefix):].replace('__', ' / ')}"
    return metric


# ------------------------------------------------------------------------------------------------ the claims
_T2 = "paper Table II (MTLESD)"
_T5 = "paper Table V and Sec. IV-D"
_PAIRS = (("injection_needle", "electrosurgical_knife"), ("fluid_bleb", "exposed_submucosa"))

CLAIMS: tuple[Claim, ...] = (
    # 02: architectures and single-task baselines (Tables II / III)
    Claim("tesla_beats_mmoe_seg", "02_main_results", "TESLA segments better than MMoE", _T2,
          "EndoARSS", "MMoE + SMA", "seg_miou_fg"),
    Claim("tesla_beats_mmoe_cls", "02_main_results", "TESLA recognises activities better than MMoE", _T2,
          "EndoARSS", "MMoE + SMA", "cls_accuracy"),
    Claim("tesla_beats_hps_seg", "02_main_results", "TESLA segments better than hard parameter sharing", _T2,
          "EndoARSS", "HPS + SMA", "seg_miou_fg"),
    Claim("tesla_beats_hps_cls", "02_main_results", "TESLA recognises activities better than hard parameter "
          "sharing", _T2, "EndoARSS", "HPS + SMA", "cls_accuracy"),
    Claim("mtl_beats_single_seg", "02_main_results", "the multi-task model segments better than the "
          "segmentation-only model", "paper Table II (DINOv2 single-task rows)", "EndoARSS", "segmentation only",
          "seg_miou_fg"),
    Claim("mtl_beats_single_cls", "02_main_results", "the multi-task model recognises activities better than the "
          "activity-only model", "paper Table III (DINOv2 single-task rows)", "EndoARSS", "activity only",
          "cls_accuracy"),
    Claim("db_mtl_beats_ew", "02_main_results", "DB-MTL (the paper's MTLESD weighting) segments better than equal "
          "weighting", "paper Table II (DB-MTL rows)", "DB-MTL", "EndoARSS", "seg_miou_fg"),
    # 04: components (Table V), row for row, plus the foundation pretraining
    Claim("foundation_beats_resnet_mmoe", "04_ablation_components", "the frozen foundation model segments better "
          "than a trainable ResNet (MMoE; rows 2 vs 1)", _T5, "MMoE (no SMA)", "ResNet + MMoE", "seg_miou_fg"),
    Claim("foundation_beats_resnet_tesla", "04_ablation_components", "the frozen foundation model segments better "
          "than a trainable ResNet (TESLA; rows 4 vs 3)", _T5, "TESLA (no SMA)", "ResNet + TESLA", "seg_miou_fg"),
    Claim("tesla_beats_mmoe_foundation", "04_ablation_components", "TESLA beats MMoE on the foundation model "
          "(rows 4 vs 2)", _T5, "TESLA (no SMA)", "MMoE (no SMA)", "seg_miou_fg"),
    Claim("tesla_beats_mmoe_resnet", "04_ablation_components", "TESLA beats MMoE on the ResNet (rows 3 vs 1)", _T5,
          "ResNet + TESLA", "ResNet + MMoE", "seg_miou_fg"),
    Claim("sma_helps_tesla", "04_ablation_components", "SMA improves segmentation (TESLA; rows 6 vs 4)", _T5,
          "EndoARSS", "TESLA (no SMA)", "seg_miou_fg"),
    Claim("sma_helps_mmoe", "04_ablation_components", "SMA improves segmentation (MMoE; rows 5 vs 2)", _T5,
          "MMoE + SMA", "MMoE (no SMA)", "seg_miou_fg"),
    Claim("sma_helps_look_alike", "04_ablation_components", "SMA helps to tell visually similar classes apart "
          "(rows 6 vs 4)", "paper Sec. IV-D", "EndoARSS", "TESLA (no SMA)",
          "seg_pair_iou_fluid_bleb__exposed_submucosa"),
    Claim("pretraining_helps_seg", "04_ablation_components", "foundation pretraining improves segmentation "
          "(pretrained vs the same ViT frozen at random init)", "paper Sec. IV-D (DINOv2's features are key)",
          "EndoARSS", "pretraining off", "seg_miou_fg"),
    Claim("pretraining_helps_cls", "04_ablation_components", "foundation pretraining improves activity recognition",
          "paper Sec. IV-D (DINOv2's features are key)", "EndoARSS", "pretraining off", "cls_accuracy"),
    # 05: rank (Table VI)
    Claim("rank4_beats_rank1", "05_ablation_rank", "rank 4 beats rank 1", "paper Table VI", "EndoARSS", "rank 1",
          "seg_miou_fg"),
    Claim("rank4_beats_rank16", "05_ablation_rank", "rank 4 beats rank 16", "paper Table VI", "EndoARSS", "rank 16",
          "seg_miou_fg"),
    # 06: robustness (Table VII, Fig. 6): pooled over every corruption and severity
    Claim("robust_beats_resnet_mmoe", "06_robustness", "EndoARSS is more robust than ResNet + MMoE (corrupted test "
          "images)", "paper Table VII, Fig. 6", "EndoARSS", "ResNet + MMoE", "seg_miou_fg", kind="corrupted"),
    Claim("robust_beats_resnet_dselect", "06_robustness", "EndoARSS is more robust than ResNet + DSelect-k "
          "(corrupted test images)", "paper Table VII, Fig. 6", "EndoARSS", "ResNet + DSelect-k", "seg_miou_fg",
          kind="corrupted"),
    Claim("robust_beats_resnet_mmoe_cls", "06_robustness", "EndoARSS recognises activities more robustly than "
          "ResNet + MMoE (corrupted test images)", "paper Table VII, Fig. 6", "EndoARSS", "ResNet + MMoE",
          "cls_accuracy", kind="corrupted"),
    Claim("severity_degrades", "06_robustness", "performance degrades as the corruption severity increases "
          "(severity 1 vs 5)", "paper Fig. 6", "severity 1", "severity 5", "seg_miou_fg", kind="conditions"),
    # 07: the look-alike pairs (Figs. 2, 5): multi-task vs segmentation only
    *(Claim(f"mtl_fewer_swaps_{a.split('_')[-1]}", "07_segmentation_gallery", f"the multi-task model confuses "
            f"{a} and {b} less than the segmentation-only model", "paper Fig. 2 and Sec. I (the activity tells "
            "look-alike classes apart)", "EndoARSS", "segmentation only", f"seg_swap_{a}__{b}") for a, b in _PAIRS),
    *(Claim(f"mtl_better_pair_{a.split('_')[-1]}", "07_segmentation_gallery", f"the multi-task model segments "
            f"{a} and {b} better than the segmentation-only model", "paper Fig. 2 and Sec. I", "EndoARSS",
            "segmentation only", f"seg_pair_iou_{a}__{b}") for a, b in _PAIRS),
    Claim("detail_draws_small_classes", "07_segmentation_gallery", "the segmentation head's detail branch draws "
          "the classes smaller than a patch (marking spots, bleeding) better than the paper's DeepLab-V3 head",
          "this project (the detail branch)", "EndoARSS", "paper head (no detail)",
          "seg_pair_iou_marking_spot__bleeding"),
    # 03: generalisation (Table IV): the same runs on the in-domain and the shifted test set, like with like
    Claim("generalisation_gap_cls", "03_generalisation", "activity recognition drops on the shifted domain "
          "(MTLEndovis -> MTLEndovis-Gen)", "paper Table IV", "in-domain", "shifted", "cls_accuracy",
          kind="conditions"),
    Claim("generalisation_gap_seg", "03_generalisation", "segmentation drops on the shifted domain", "paper Table IV",
          "in-domain", "shifted", "seg_miou_eval", kind="conditions"),
    # 09: conflict (Sec. IV-D: "TESLA ... reduces gradient conflicts"): not a function of test images
    Claim("tesla_less_conflict", "09_task_conflict", "TESLA reduces the conflict between the tasks' gradients "
          "(higher mean cosine on the shared parameters than HPS)", "paper Sec. V", "EndoARSS", "HPS + SMA",
          "mean_cosine", per_image=False, higher_is_better=True),
    # 10: the seed components against the same baseline
    Claim("cmoe_helps_hps", "10_seed_components", "Uni-Med's CMoE connector improves HPS", "Uni-Med (seed 003)",
          "HPS + CMoE", "HPS + SMA", "seg_miou_fg"),
    Claim("cmoe_helps_tesla", "10_seed_components", "Uni-Med's CMoE connector improves TESLA", "Uni-Med (seed 003)",
          "TESLA + CMoE", "EndoARSS", "seg_miou_fg"),
    Claim("gm_coord_beats_ew_seg", "10_seed_components", "UMD's GM-Coord improves on equal weighting "
          "(segmentation)", "UMD (seed 002)", "GM-Coord", "EndoARSS", "seg_miou_fg"),
    Claim("gm_coord_beats_ew_cls", "10_seed_components", "UMD's GM-Coord improves on equal weighting (activity)",
          "UMD (seed 002)", "GM-Coord", "EndoARSS", "cls_accuracy"),
    Claim("cgl_helps_tail", "10_seed_components", "MEJO's CGL loss improves the recall of tail activities "
          "(long-tailed MTLEndovis)", "MEJO (seed 000)", "CGL", "EndoARSS", "recall_tail", per_image=False,
          higher_is_better=True),
    # 11: the released code, measured (this project's claims)
    Claim("trained_sma_beats_frozen", "11_paper_vs_released_code", "a trained SMA beats the released code's SMA "
          "frozen at random init", "this project (released code)", "EndoARSS", "SMA frozen (released)",
          "seg_miou_fg"),
    Claim("spatial_map_beats_released", "11_paper_vs_released_code", "the spatial token map beats the released "
          "code's reshape (tokens as channels)", "this project (released code)", "EndoARSS", "token map (released)",
          "seg_miou_fg"),
    Claim("test_selection_inflates", "11_paper_vs_released_code", "choosing the epoch on the test set inflates the "
          "reported test numbers", "this project (released code)", "selection on test (released)", "EndoARSS",
          "seg_miou_fg"),
)


def claims_for(notebook: str) -> tuple[Claim, ...]:
    """The claims a notebook tests."""
    found = tuple(c for c in CLAIMS if c.notebook == notebook)
    if not found:
        raise KeyError(f"no claims for notebook {notebook!r}; notebooks: {sorted({c.notebook for c in CLAIMS})}")
    return found


def get_claim(claim_id: str) -> Claim:
    """The claim ``claim_id``."""
    for c in CLAIMS:
        if c.id == claim_id:
            return c
    raise KeyError(f"unknown claim {claim_id!r}; claims: {[c.id for c in CLAIMS]}")


def decide(claim: Claim, values: Mapping[tuple[str, int], float] | None = None,
           outcomes: Mapping[tuple[str, int], Mapping[str, np.ndarray]] | None = None,
           class_names: Sequence[str] | None = None, scale: str = "demonstration", decides: bool = True,
           n_boot: int = N_BOOTSTRAP, level: float = LEVEL) -> Verdict:
    """The verdict of ``claim`` from ``{(side, seed): value}`` and/or ``{(side, seed): per-image outcomes}``
    (sides: ``claim.better`` and ``claim.worse``; seeds present on both sides are paired).

    With outcomes, each side's value is recomputed from them (the run's test value) and the bootstrap resamples the
    test images, paired when both sides hold the same images (same count and paths); otherwise ``values`` give the
    per-seed values and the seed interval alone decides. ``decides=False`` (the test scale) computes everything and
    leaves the verdict ``not decided (test scale)``.
    """
    source = outcomes if claim.per_image and outcomes else values
    if source is None:
        raise ValueError(f"claim {claim.id!r}: give values or per-image outcomes")
    seeds = sorted({s for side, s in source if side == claim.better} & {s for side, s in source if side == claim.worse})
    sign = 1.0 if claim.higher else -1.0
    result = Verdict(claim, scale, seeds=seeds)
    if not seeds:
        return result

    def value(side: str, seed: int, idx=None) -> float:
        if source is values:
            return float(values[(side, seed)])
        try:
            return outcome_value(outcomes[(side, seed)], claim.metric, idx, class_names)
        except OutcomeKeyError as exc:
            raise KeyError(f"claim {claim.id!r}: {exc}") from None

    result.better_values = [value(claim.better, s) for s in seeds]
    result.worse_values = [value(claim.worse, s) for s in seeds]
    result.differences = [sign * (b - w) for b, w in zip(result.better_values, result.worse_values)]
    result.mean_difference, result.seed_low, result.seed_high = t_interval(result.differences, level)
    use_boot = source is not values
    if use_boot:
        first_b, first_w = outcomes[(claim.better, seeds[0])], outcomes[(claim.worse, seeds[0])]
        n_b, n_w = len(first_b["path"]), len(first_w["path"])
        paired = n_b == n_w and np.array_equal(first_b["path"], first_w["path"])

        def difference(idx_b, idx_w):
            return float(np.mean([sign * (value(claim.better, s, idx_b) - value(claim.worse, s, idx_w))
                                  for s in seeds]))

        result.boot_low, result.boot_high = bootstrap_interval(difference, n_b, n_w, paired, n_boot=n_boot,
                                                               level=level)
    if decides:
        result.verdict = verdict(len(seeds), result.seed_low, result.seed_high, result.boot_low, result.boot_high,
                                 bootstrap=use_boot)
    return result


def sentence(v: Verdict) -> str:
    """The one wording of a verdict (what a notebook prints after its table)."""
    c = v.claim
    what = metric_label(c.metric)
    if not v.seeds:
        return f"{c.statement} ({c.source}): no runs of both {c.better!r} and {c.worse!r} to compare."
    numbers = (f"{c.better} {_mean(v.better_values):.3f} vs {c.worse} {_mean(v.worse_values):.3f} "
               f"({what}, {'higher' if c.higher else 'lower'} is better; mean paired difference "
               f"{v.mean_difference:+.3f} over {len(v.seeds)} seed(s); 95 % intervals: {_interval_text(v)})")
    if v.verdict == NOT_DECIDED:
        return (f"TEST SCALE, not evidence: {numbers}. Whether {c.statement} ({c.source}) is decided at the "
                f"demonstration scale (results/tables/claims.csv).")
    if v.verdict == "demonstrated":
        return f"DEMONSTRATED: {c.statement}, as {c.source} says: {numbers}."
    if v.verdict == "reversed":
        return f"REVERSED: {c.source} says {c.statement}; here the opposite holds beyond the noise: {numbers}."
    return (f"INCONCLUSIVE: {c.statement} ({c.source}) is neither shown nor reversed here; the difference is "
            f"within the noise of the seeds or the test images: {numbers}.")


def claims_frame(verdicts: Sequence[Verdict]):
    """The rows of ``claims.csv`` as a DataFrame."""
    return pd.DataFrame([v.row() for v in verdicts])


def _as_dict(claim: Claim) -> dict:
    return asdict(claim)
