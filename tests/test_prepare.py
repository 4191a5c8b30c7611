"""Preparation commands: validation reports and the EndoVis converters, on hand-made mock downloads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from endoarss_lib.data import DataError, MTLDataset
from endoarss_lib.data.prepare import (ENDOVIS18_TYPE_TO_TRAIN, convert_colour_masks, convert_endovis17, convert_endovis18,
                                       frame_activity, main, parse_vqla_label, validate)

from .test_dataset import write_pair


@pytest.fixture
def esd_root(tmp_path):
    root = tmp_path / "esd"
    for activity in (1, 2, 3):
        for i in range(3):
            write_pair(root, "train", activity, f"a{activity}_{i}")
        write_pair(root, "test", activity, f"t{activity}")
    return root


def test_validate_ok_writes_index_and_counts(esd_root):
    report = validate(esd_root, "mtlesd")
    assert report.ok, report.format()
    assert report.counts == {"train": {"marking": 3, "injection": 3, "submucosal_dissection": 3},
                             "test": {"marking": 1, "injection": 1, "submucosal_dissection": 1}}
    assert any("Table I has 1618" in w for w in report.warnings)
    index = json.loads((esd_root / "index.json").read_text())
    assert len(index["samples"]) == 12
    # raw values: half of every 40x30 mask is 0, the other half the activity id
    assert report.raw_values == {0: 12 * 600, 1: 4 * 600, 2: 4 * 600, 3: 4 * 600}


def test_validate_collects_every_problem_and_names_files(esd_root):
    write_pair(esd_root, "train", 1, "a1_0", mask_value=9)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(esd_root / "train" / "2" / "mask" / "a2_0.png")
    (esd_root / "train" / "3" / "image" / "a3_0.png").write_bytes(b"garbage")
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(esd_root / "test" / "1" / "mask" / "t1.png")
    report = validate(esd_root, "mtlesd")
    assert not report.ok
    text = "\n".join(report.problems)
    assert "a1_0.png: mask values [9]" in text
    assert "a2_0.png: mask has mode 'RGB'" in text
    assert "a3_0.png: cannot decode image" in text
    assert "t1.png: mask size 5x5 differs" in text
    assert len(report.problems) == 4
    assert not (esd_root / "index.json").exists()


def test_validate_suggests_released_map_for_one_based_masks(tmp_path):
    root = tmp_path / "one_based"
    for activity in (1, 2, 3):
        write_pair(root, "train", activity, "a", mask_value=7)
        write_pair(root, "test", activity, "b", mask_value=1)
    # 0 is present too (left half), so check the rule on a set whose masks run 1..7 only.
    for mask in root.glob("*/*/mask/*.png"):
        arr = np.asarray(Image.open(mask)).copy()
        arr[arr == 0] = 1
        Image.fromarray(arr, mode="L").save(mask)
    report = validate(root, "mtlesd", id_map="released")
    assert report.ok
    assert any("1-based" in w for w in report.warnings)
    assert not validate(root, "mtlesd", write_index=False).ok  # 7 is outside the identity map of 7 classes


def test_cli_validate_exit_codes(esd_root, capsys):
    assert main(["validate", str(esd_root), "--dataset", "mtlesd", "--no-index"]) == 0
    assert "OK" in capsys.readouterr().out
    write_pair(esd_root, "train", 1, "a1_0", mask_value=9)
    assert main(["validate", str(esd_root), "--dataset", "mtlesd"]) == 1
    assert "PROBLEM" in capsys.readouterr().out
    assert main(["validate", str(esd_root / "missing"), "--dataset", "mtlesd"]) == 1
    assert main(["sources"]) == 0
    assert "never downloads" in capsys.readouterr().out


# ---- VQLA labels ----

def test_parse_vqla_label(tmp_path):
    path = tmp_path / "frame000.txt"
    path.write_text("What is the state of bipolar_forceps?|Idle|12,30,50,80\n"
                    "Where is bipolar_forceps located?|left-top\n"
                    "What is the state of monopolar_curved_scissors?|Cutting\n\n")
    assert parse_vqla_label(path) == {"bipolar_forceps": "Idle", "monopolar_curved_scissors": "Cutting"}
    path.write_text("no separator here\n")
    with pytest.raises(DataError, match=r"frame000.txt:1: expected 'question\|answer'"):
        parse_vqla_label(path)


def test_frame_activity_rule():
    assert frame_activity({"a": "Idle", "b": "Cutting"}, "f") == "cutting"
    assert frame_activity({"a": "Idle", "b": "Idle"}, "f") == "idle"
    assert frame_activity({"a": "Tissue_Manipulation", "b": "Retraction", "c": "Retraction"}, "f") == "retraction"
    assert frame_activity({"a": "Suturing", "b": "Looping"}, "f") == "looping"  # tie: alphabetical
    with pytest.raises(DataError, match="f: answer 'Dancing' is not one of the 12"):
        frame_activity({"a": "Dancing"}, "f")
    with pytest.raises(DataError, match="no 'What is the state"):
        frame_activity({}, "f")


# ---- converters ----

def _mock_download(root: Path, seq_prefix: str, n_seq: int, n_frames: int, states: list[str], type_ids: list[int]):
    rng = np.random.default_rng(0)
    frames, masks, vqla = root / "frames", root / "types", root / "vqla"
    for s in range(n_seq):
        seq = f"{seq_prefix}{s + 1}"
        for sub in (frames / seq / "left_frames", masks / seq, vqla / seq / "vqla" / "label"):
            sub.mkdir(parents=True, exist_ok=True)
        for f in range(n_frames):
            name = f"frame{f:03d}"
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
                frames / seq / "left_frames" / f"{name}.png")
            mask = np.zeros((24, 32), np.uint8)
            mask[:, :8] = type_ids[(s * n_frames + f) % len(type_ids)]
            Image.fromarray(mask, mode="L").save(masks / seq / f"{name}.png")
            state = states[(s * n_frames + f) % len(states)]
            (vqla / seq / "vqla" / "label" / f"{name}.txt").write_text(
                f"What is the state of bipolar_forceps?|{state}\nWhat is the state of prograsp_forceps?|Idle\n")
    return frames, masks, vqla


def test_convert_endovis18_layout_split_and_ids(tmp_path):
    frames, masks, vqla = _mock_download(tmp_path, "seq_", 2, 10, ["Cutting", "Suction", "Idle", "Grasping"],
                                         [1, 2, 3, 4, 5, 6, 7])
    out = convert_endovis18(frames, masks, vqla, tmp_path / "MTLEndovis", seed=0)
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["synthetic"] is False and card["dataset"] == "mtlendovis"
    assert sum(card["counts"]["train"].values()) + sum(card["counts"]["test"].values()) == 20
    assert sum(card["counts"]["test"].values()) == 4  # 4:1, stratified over 4 activities of 5 frames each
    train = MTLDataset(out, "train", dataset="mtlendovis", val_fraction=0)
    assert sorted(set(train.labels)) == [2, 3, 4, 9]  # cutting, grasping, idle, suction
    # Source type id 2 (prograsp in ISINet order) becomes train id 3 (prograsp_forceps in the registry).
    seen = {}
    for i, sample in enumerate(train.samples):
        src = np.asarray(Image.open(masks / sample.image.name.split("_frame")[0] /
                                    ("frame" + sample.image.stem.split("_frame")[1] + ".png")))
        seen[int(src[0, 0])] = int(train.load_raw(i)[1][0, 0])
    assert all(seen[k] == ENDOVIS18_TYPE_TO_TRAIN[k] for k in seen) and len(seen) >= 5
    assert validate(out, "mtlendovis", write_index=False).ok
    with pytest.raises(DataError, match="already exists"):
        convert_endovis18(frames, masks, vqla, out)


def test_convert_endovis18_missing_files_are_named(tmp_path):
    frames, masks, vqla = _mock_download(tmp_path, "seq_", 1, 3, ["Cutting"], [1])
    (masks / "seq_1" / "frame001.png").unlink()
    with pytest.raises(DataError, match=r"missing: \[.*seq_1/frame001.png"):
        convert_endovis18(frames, masks, vqla, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="--frames .*does not exist"):
        convert_endovis18(tmp_path / "nope", masks, vqla, tmp_path / "out")


def test_convert_endovis17_unmapped_classes(tmp_path):
    frames, masks, vqla = _mock_download(tmp_path, "instrument_dataset_", 1, 4, ["Cutting", "Idle"], [1, 4, 6, 7])
    with pytest.raises(DataError, match="source class 4 has no MTLEndovis class"):
        convert_endovis17(frames, masks, vqla, tmp_path / "gen")
    assert not (tmp_path / "gen").exists()  # nothing half-written
    out = convert_endovis17(frames, masks, vqla, tmp_path / "gen", unmapped="background")
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["unmapped_pixels_to_background"] == {"4": 24 * 8}
    assert not (out / "train").exists()
    ds = MTLDataset(out, "test", dataset="mtlendovis_gen")
    assert len(ds) == 4 and set(ds.labels) == {2, 4}


def test_colour_masks_are_converted_through_an_exact_palette(tmp_path):
    src = tmp_path / "colour"
    for activity in (1, 2, 3):
        image, _ = write_pair(src, "test", activity, f"c{activity}")
        rgb = np.zeros((30, 40, 3), np.uint8)
        rgb[:, 20:] = (255, 0, 0) if activity == 1 else (0, 255, 0)
        Image.fromarray(rgb).save(src / "test" / str(activity) / "mask" / f"c{activity}.png")
    palette = {"0,0,0": 0, "255,0,0": 3, "0,255,0": 5}
    out = convert_colour_masks(src, palette, tmp_path / "indexed")
    ds = MTLDataset(out, "test", dataset="mtlesd")
    assert set(np.unique(ds.load_raw(0)[1])) == {0, 3} and set(np.unique(ds.load_raw(1)[1])) == {0, 5}
    assert (out / "test" / "1" / "image" / "c1.png").read_bytes() == (src / "test" / "1" / "image" / "c1.png").read_bytes()
    with pytest.raises(DataError, match=r"c1.png: colours \[\(255, 0, 0\)\] are not in the palette"):
        convert_colour_masks(src, {"0,0,0": 0, "0,255,0": 5}, tmp_path / "again")
    assert not (tmp_path / "again").exists()
