"""The paper's tables as CSV: known cells read from the paper's text, cross-table identities, side_by_side."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from endoarss_lib.evaluation.paper import (PAPER_METRICS, PAPER_TABLES, PAPER_TO_OURS, load_paper_table,
                                           paper_table_for, side_by_side)
from endoarss_lib.robustness.corruptions import CORRUPTION_GROUPS, CORRUPTIONS
from endoarss_lib.tasks import result_keys

MAIN_KEYS = ["dataset", "backbone", "arch", "weighting", "task"]
ROW_COUNTS = {"table1": 3, "table2": 29, "table3": 29, "table4": 27, "table5": 12, "table6": 8, "table7": 60}
VOCABULARY = {"dataset": {"mtlesd", "mtlendovis", "mtlendovis_gen"}, "backbone": {"resnet101", "dinov2", "endoarss"},
              "arch": {"mmoe", "dselect_k", "tesla", "single"},
              "weighting": {"moco", "aligned_mtl", "stch", "db_mtl", "none"}, "task": {"both", "cls", "seg"}}
UNIQUE_KEYS = {"table2": MAIN_KEYS, "table3": MAIN_KEYS, "table4": MAIN_KEYS,
               "table5": ["dataset", "DINOv2", "TESLA", "SMA"], "table6": ["dataset", "rank"],
               "table7": ["corruption", "backbone", "arch"]}


def _row(table: str, **keys) -> pd.Series:
    df = load_paper_table(table)
    hit = df[np.logical_and.reduce([df[k] == v for k, v in keys.items()])]
    assert len(hit) == 1, f"{table} {keys}: {len(hit)} rows"
    return hit.iloc[0]


def _metrics(row: pd.Series, names=PAPER_METRICS) -> list[float]:
    return [row[m] for m in names]


@pytest.mark.parametrize("table", list(PAPER_TABLES))
def test_every_table_loads_with_its_row_count_and_our_vocabulary(table):
    df = load_paper_table(table)
    assert len(df) == ROW_COUNTS[table]
    assert set(df["table"]) == {table}
    for column, allowed in VOCABULARY.items():
        if column in df:
            assert set(df[column]) <= allowed, column
    if table in UNIQUE_KEYS:
        assert not df.duplicated(UNIQUE_KEYS[table]).any()


def test_table_names_have_aliases_and_unknown_names_fail_clearly():
    pd.testing.assert_frame_equal(load_paper_table("II"), load_paper_table("table2"))
    pd.testing.assert_frame_equal(load_paper_table(2), load_paper_table("Table II"))
    with pytest.raises(KeyError, match="table1"):
        load_paper_table("table8")
    assert set(paper_table_for("synthetic_mtlendovis")["table"]) == {"table3"}
    assert set(paper_table_for("mtlendovis_gen")["table"]) == {"table4"}
    with pytest.raises(KeyError, match="mtlesd"):
        paper_table_for("cholec80")


# ------------------------------------------------------------------------------------------------ known cells

def test_table1_dataset_counts():
    df = load_paper_table("table1").set_index("dataset")
    assert df.loc["mtlesd", ["C_Class", "S_Class", "Train", "Test", "Total"]].tolist() == [3, 6, 1618, 402, 2020]
    assert df.loc["mtlendovis", ["C_Class", "S_Class", "Train", "Test", "Total"]].tolist() == [12, 7, 1601, 395, 1996]
    assert df.loc["mtlendovis_gen", ["C_Class", "S_Class", "Train", "Test", "Total"]].tolist() == [6, 5, 0, 97, 97]
    assert (df["Train"] + df["Test"] == df["Total"]).all()


def test_table2_mtlesd_known_rows():
    row = _row("table2", backbone="endoarss", arch="tesla", weighting="db_mtl")
    assert _metrics(row) == [99.99, 99.95, 92.16, 95.79, 13.25, 95.67]
    seg_only = _row("table2", backbone="dinov2", task="seg")
    assert _metrics(seg_only, ["mIoU", "DS", "HD", "SSIM"]) == [88.19, 93.39, 15.22, 94.04]
    assert math.isnan(seg_only["AC"]) and math.isnan(seg_only["F_score"])
    assert _row("table2", backbone="resnet101", arch="mmoe", weighting="aligned_mtl")["DS"] == 88.6
    assert _row("table2", backbone="dinov2", arch="dselect_k", weighting="aligned_mtl")["mIoU"] == 87.81


def test_table3_mtlendovis_known_rows():
    assert _metrics(_row("table3", backbone="endoarss", arch="tesla", weighting="stch")) == [
        72.18, 66.77, 72.95, 83.47, 19.52, 91.26]
    assert _metrics(_row("table3", backbone="resnet101", arch="mmoe", weighting="moco")) == [
        63.35, 54.62, 54.24, 68.40, 24.02, 86.47]
    cls_only = _row("table3", backbone="dinov2", task="cls")
    assert [cls_only["AC"], cls_only["F_score"]] == [68.90, 62.52] and math.isnan(cls_only["mIoU"])
    assert _metrics(_row("table3", backbone="dinov2", task="seg"), ["mIoU", "DS", "HD", "SSIM"]) == [
        63.34, 76.53, 21.27, 88.93]


def test_table4_generalisation_known_rows():
    assert _metrics(_row("table4", backbone="endoarss", arch="tesla", weighting="stch")) == [
        49.24, 52.78, 49.10, 49.73, 22.17, 88.27]
    assert _row("table4", backbone="resnet101", arch="tesla", weighting="moco")["HD"] == 26.8
    assert _metrics(_row("table4", backbone="dinov2", arch="tesla", weighting="aligned_mtl")) == [
        48.96, 50.11, 48.31, 49.50, 22.11, 87.37]


def test_table5_ablation_with_per_class_spread():
    first = _row("table5", dataset="mtlendovis", DINOv2=False, TESLA=False, SMA=False)
    assert [first["AC"], first["AC_pm"], first["mIoU"], first["mIoU_pm"]] == [65.83, 29.80, 58.45, 12.75]
    full = _row("table5", dataset="mtlesd", DINOv2=True, TESLA=True, SMA=True)
    assert [full["mIoU"], full["mIoU_pm"], full["HD"]] == [92.16, 5.06, 13.25]
    assert (full["backbone"], full["arch"]) == ("endoarss", "tesla")


def test_table6_and_table7_known_cells():
    assert _metrics(_row("table6", dataset="mtlendovis", rank=16)) == [72.04, 66.12, 69.15, 80.74, 20.42, 90.43]
    mean = _row("table7", corruption="mean", backbone="endoarss")
    assert [mean["AC"], mean["mIoU"]] == [91.29, 79.57]
    smoke = _row("table7", corruption="smoke", arch="dselect_k")
    assert [smoke["AC"], smoke["mIoU"]] == [8.71, 62.49]
    blur = _row("table7", corruption="gaussian_blur", arch="mmoe")
    assert [blur["AC"], blur["mIoU"]] == [65.61, 74.03]


# ------------------------------------------------------------------------------------------------ invariants

@pytest.mark.parametrize("table", ["table2", "table3", "table4", "table5", "table6"])
def test_no_missing_numbers_except_the_single_task_na_cells(table):
    df = load_paper_table(table)
    cls_cols, seg_cols = ["AC", "F_score"], ["mIoU", "DS", "HD", "SSIM"]
    both = df[df["task"] == "both"]
    assert both[list(PAPER_METRICS)].notna().all().all()
    assert df.loc[df["task"] == "cls", cls_cols].notna().all().all()
    assert df.loc[df["task"] == "cls", seg_cols].isna().all().all()
    assert df.loc[df["task"] == "seg", seg_cols].notna().all().all()
    assert df.loc[df["task"] == "seg", cls_cols].isna().all().all()


def test_table7_mean_row_is_the_mean_of_the_19_corruptions():
    df = load_paper_table("table7")
    assert df[["AC", "mIoU"]].notna().all().all()
    assert list(dict.fromkeys(df["corruption"])) == [*CORRUPTIONS, "mean"]
    groups = {name: group for group, names in CORRUPTION_GROUPS.items() for name in names}
    rows = df[df["corruption"] != "mean"]
    assert (rows["corruption"].map(groups) == rows["corruption_group"]).all()
    means = rows.groupby(["backbone", "arch"])[["AC", "mIoU"]].mean()
    printed = df[df["corruption"] == "mean"].set_index(["backbone", "arch"])[["AC", "mIoU"]]
    assert np.abs(means.loc[printed.index].to_numpy() - printed.to_numpy()).max() <= 0.0051


def test_table5_rows_are_the_matching_rows_of_tables_2_and_3():
    ablation = load_paper_table("table5")
    main = pd.concat([load_paper_table("table2"), load_paper_table("table3")])
    merged = ablation.merge(main, on=MAIN_KEYS, suffixes=("", "_main"), validate="one_to_one")
    assert len(merged) == len(ablation)
    for metric in PAPER_METRICS:
        differ = merged[merged[metric] != merged[f"{metric}_main"]]
        if metric == "HD":  # the paper's one inconsistency: 19.53 in Table V, 19.52 in Table III
            assert differ[["dataset", "backbone", "arch", "HD", "HD_main"]].values.tolist() == [
                ["mtlendovis", "endoarss", "tesla", 19.53, 19.52]]
        else:
            assert differ.empty, metric


def test_table6_rank4_rows_equal_table5_full_model_rows():
    rank4 = load_paper_table("table6").query("rank == 4").set_index("dataset")[list(PAPER_METRICS)]
    full = load_paper_table("table5").query("DINOv2 and TESLA and SMA").set_index("dataset")[list(PAPER_METRICS)]
    pd.testing.assert_frame_equal(rank4.sort_index(), full.sort_index())


def test_paper_columns_map_to_keys_our_result_rows_have():
    ours = set(result_keys(split="test"))
    for metric, spec in PAPER_TO_OURS.items():
        assert spec.compat in ours and spec.correct in ours, metric
        assert spec.scale == (1.0 if metric == "HD" else 100.0)


# ------------------------------------------------------------------------------------------------ side_by_side

def _ours() -> pd.DataFrame:
    base = dict(dataset="mtlesd", data="synthetic", random_init_backbone=True, tasks="cls+seg")
    rows = [dict(base, backbone="vit_tiny_patch14", sma=True, arch="tesla", weighting="db_mtl", seed=seed,
                 test_cls_compat_ac=ac, test_cls_accuracy=0.5, test_seg_compat_hd=hd, test_seg_hd=2.0,
                 test_seg_compat_miou=0.25)
            for seed, ac, hd in ((0, 0.4, 10.0), (1, 0.6, 14.0))]
    rows.append(dict(base, dataset="synthetic_mtlesd", backbone="vit_tiny_patch14", sma=False, arch="hps",
                     weighting="ew", tasks="seg", seed=0, test_seg_compat_miou=0.5, test_seg_miou=0.4))
    rows.append(dict(base, backbone="resnet_tiny", sma=False, arch="hps", weighting="ew", seed=0, data="real",
                     random_init_backbone=False, test_seg_compat_miou=0.1))
    return pd.DataFrame(rows)


def test_side_by_side_puts_our_compat_values_in_paper_units_beside_the_paper():
    out = side_by_side(_ours(), load_paper_table("table2")).set_index(["backbone", "arch", "weighting", "task"])
    full = out.loc[("endoarss", "tesla", "db_mtl", "both")]
    assert full["runs"] == 2 and full["backbone_ours"] == "vit_tiny_patch14"
    assert full["AC_paper"] == 99.99 and full["AC_compat"] == pytest.approx(50.0)
    assert full["AC_correct"] == pytest.approx(50.0) and full["mIoU_compat"] == pytest.approx(25.0)
    assert full["HD_paper"] == 13.25 and full["HD_compat"] == pytest.approx(12.0) and full["HD_correct"] == 2.0
    assert "SYNTHETIC" in full["provenance"] and "random-init" in full["provenance"]
    assert math.isnan(full["SSIM_compat"])
    seg = out.loc[("dinov2", "single", "none", "seg")]
    assert seg["mIoU_paper"] == 88.19 and seg["mIoU_compat"] == pytest.approx(50.0)
    assert seg["mIoU_correct"] == pytest.approx(40.0)
    hps = out.loc[("resnet101", "hps", "ew", "both")]
    assert math.isnan(hps["mIoU_paper"]) and hps["provenance"] == "real data"
    columns = list(out.columns)
    assert columns.index("AC_paper") + 1 == columns.index("AC_compat") == columns.index("AC_correct") - 1


def test_side_by_side_outer_keeps_the_paper_rows_and_checks_keys():
    out = side_by_side(_ours(), load_paper_table("table2"), how="outer")
    assert len(out) == 29 + 1  # every paper row, plus our ResNet + HPS + EW row the paper does not have
    with pytest.raises(ValueError, match="not unique"):
        side_by_side(_ours(), load_paper_table("table7"))
    with pytest.raises(KeyError, match="rank"):
        side_by_side(_ours(), load_paper_table("table2"), on=[*MAIN_KEYS, "rank"])
