"""`scripts/notebook_outputs.py collect`: the demonstration's small outputs and the README's generated Measured
section, on a made-up project tree (run folders, notebook rows and claims, executed copies) checked against numbers
computed here with NumPy and scikit-learn."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import jaccard_score

from endoarss_lib.data import get_spec
from endoarss_lib.evidence.variants import FEATURED

ROOT = Path(__file__).resolve().parents[1]
CLASSES = get_spec("mtlesd").seg_classes
K = len(CLASSES)


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("notebook_outputs", ROOT / "scripts" / "notebook_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "NOTEBOOKS", tmp_path / "notebooks")
    monkeypatch.setattr(module, "EXECUTED", tmp_path / "results" / "executed")
    monkeypatch.setattr(module, "DEMONSTRATION", tmp_path / "results" / "demonstration")
    monkeypatch.setattr(module, "TABLES", tmp_path / "results" / "tables")
    return module


def _run(folder: Path, rng, variant: str, seed: int, quality: float, dataset="mtlesd"):
    """A finished run folder with per-image outcomes; returns its notebook row and its pixels (truth, prediction)."""
    folder.mkdir(parents=True)
    masks = rng.integers(0, K, (6, 10, 10))
    preds = np.where(rng.random(masks.shape) < quality, masks, rng.integers(0, K, masks.shape))
    conf = np.stack([np.bincount(m.ravel() * K + p.ravel(), minlength=K * K).reshape(K, K)
                     for m, p in zip(masks, preds)])
    np.savez(folder / "test_per_image.npz", seg_confusion=conf, cls_true=np.zeros(6, int), cls_pred=np.zeros(6, int),
             path=np.array([f"{i}.png" for i in range(6)]))
    ious = jaccard_score(masks.ravel(), preds.ravel(), average=None, labels=range(K))
    row = {"variant": variant, "seed": seed, "dataset": dataset, "scale": "demonstration", "run_dir": str(folder),
           "test_cls_accuracy": 0.5 + seed / 10, "test_seg_miou_fg": float(ious[1:].mean()), "status": "ok"}
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    (folder / "result.json").write_text(json.dumps(row))
    (folder / "last.pt").write_bytes(b"checkpoint")  # never collected
    return row, ious


def _notebook(path: Path, scale: str | None):
    nb = nbformat.v4.new_notebook()
    if scale:
        nb.metadata["endoarss"] = {"scale": scale}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def _tree(root: Path, rng, qualities=(0.9, 0.8)):
    runs = root / "results" / "runs"
    rows, ious = [], []
    for seed, q in enumerate(qualities):
        row, iou = _run(runs / f"featured-s{seed}", rng, FEATURED, seed, q)
        rows.append(row)
        ious.append(iou)
    other, _ = _run(runs / "segonly-s0", rng, "segmentation only", 0, 0.5)
    test_row = {**other, "scale": "test", "run_dir": str(runs / "test-scale")}  # left out: another scale
    for name, scale in (("02_main", "demonstration"), ("07_segmentation_gallery", "test")):
        _notebook(root / "notebooks" / f"{name}.ipynb", None)
        _notebook(root / "results" / "executed" / f"{name}.ipynb", scale)
    out = root / "results" / "02_main"
    out.mkdir(parents=True)
    (out / "rows.json").write_text(json.dumps(rows + [other, test_row]))
    claims = pd.DataFrame([
        {"claim": "a", "notebook": "02_main", "statement": "A beats B", "source": "paper", "metric": "seg_miou_fg",
         "mean_difference": 0.05, "interval": "seeds [+0.01, +0.09]", "verdict": "demonstrated",
         "scale": "demonstration"},
        {"claim": "b", "notebook": "02_main", "statement": "C beats D", "source": "paper", "metric": "cls_accuracy",
         "mean_difference": -0.02, "interval": "seeds [-0.05, +0.01]", "verdict": "inconclusive",
         "scale": "demonstration"},
        {"claim": "c", "notebook": "02_main", "statement": "E beats F", "source": "paper", "metric": "cls_accuracy",
         "mean_difference": 0.3, "interval": "-", "verdict": "not decided (test scale)", "scale": "test"}])
    claims.to_csv(out / "claims.csv", index=False)
    gallery = root / "results" / "07_segmentation_gallery"
    gallery.mkdir(parents=True)
    pd.DataFrame([{"predictor": "EndoARSS (mean over seeds)", "test activity accuracy": 0.7},
                  {"predictor": "oracle on the true mask's classes, look-alike pairs merged",
                   "test activity accuracy": 0.84375}]).to_csv(gallery / "activity_ceiling.csv", index=False)
    (root / "README.md").write_text("# x\n\n## Measured\n\n<!-- measured:start -->\nold\n<!-- measured:end -->\n\nend\n")
    return rows, np.array(ious)


def test_collect_copies_small_files_tables_and_generates_the_measured_section(outputs, tmp_path):
    rows, ious = _tree(tmp_path, np.random.default_rng(0))
    outputs.collect()
    demo = tmp_path / "results" / "demonstration"
    assert sorted(p.name for p in demo.iterdir()) == ["featured-s0", "featured-s1", "segonly-s0"]  # not the test row
    assert sorted(p.name for p in (demo / "featured-s0").iterdir()) == ["config.json", "result.json",
                                                                        "test_per_image.npz"]  # no checkpoint
    table = pd.read_csv(tmp_path / "results" / "tables" / "demonstration.csv")
    featured = table[table["featured"]].sort_values("seed")
    assert len(table) == 3 and featured["seed"].tolist() == [0, 1]
    for i, name in enumerate(CLASSES):  # every class's IoU by name, as scikit-learn computes it
        assert featured[f"test_seg_iou_{name}"].to_numpy() == pytest.approx(ious[:, i])
    claims = pd.read_csv(tmp_path / "results" / "tables" / "claims.csv")
    assert claims["claim"].tolist() == ["a", "b"]  # the test-scale claim is not a verdict
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# x\n\n## Measured\n") and readme.endswith("<!-- measured:end -->\n\nend\n")
    assert "old" not in readme
    fg = ious[:, 1:].mean(axis=1)
    assert f"foreground mIoU {fg.mean():.3f} +- {np.std(fg, ddof=1):.3f}" in readme
    acc = np.array([r["test_cls_accuracy"] for r in rows])
    assert f"activity accuracy {acc.mean():.3f} +- {np.std(acc, ddof=1):.3f}" in readme
    goal = "met" if fg.mean() >= 0.5 else "missed"
    assert f"foreground mIoU >= 0.5: **{goal}** ({fg.mean():.3f})" in readme
    low = [n for n, v in zip(CLASSES[1:], ious[:, 1:].mean(axis=0)) if v < 0.2]
    assert ("(below: " + ", ".join(low) + ")" in readme) if low else "class's IoU >= 0.2: **met**" in readme
    assert "1 demonstrated, 0 reversed, 1 inconclusive" in readme
    assert (tmp_path / "results" / "tables" / "activity_ceiling.csv").is_file()
    assert f"activity accuracy {acc.mean():.3f} +- {np.std(acc, ddof=1):.3f} (the data's activity ceiling" in readme
    assert "look-alike pair merged: 0.844)" in readme
    assert "**In progress**" in readme and "`07_segmentation_gallery`" in readme.split("**In progress**")[1].split("\n")[0]


def test_the_goals_are_missed_when_the_featured_model_is_poor(outputs, tmp_path):
    _tree(tmp_path, np.random.default_rng(1), qualities=(0.1, 0.15))
    outputs.collect()
    readme = (tmp_path / "README.md").read_text()
    assert "foreground mIoU >= 0.5: **missed**" in readme and "class's IoU >= 0.2: **missed** (below: " in readme


def test_collect_without_demonstration_rows_says_what_to_run(outputs, tmp_path):
    (tmp_path / "notebooks").mkdir()
    with pytest.raises(SystemExit, match="make executed"):
        outputs.collect()


def test_without_featured_rows_the_section_says_so_and_claims_no_goal(outputs, tmp_path):
    _tree(tmp_path, np.random.default_rng(2))
    rows_path = tmp_path / "results" / "02_main" / "rows.json"
    rows_path.write_text(json.dumps([r for r in json.loads(rows_path.read_text()) if r["variant"] != FEATURED]))
    outputs.collect()
    readme = (tmp_path / "README.md").read_text()
    assert "no notebook executed at this scale has reported it yet" in readme
    assert "Segmentation goals" not in readme and "1 demonstrated, 0 reversed, 1 inconclusive" in readme


def test_a_notebook_shows_its_committed_verdicts(tmp_path, monkeypatch):
    # what every notebook's last claims cell shows once claims.csv is committed (collect writes it)
    from endoarss_lib.experiments.experiment import Experiment

    monkeypatch.chdir(tmp_path)  # outside the repository: results/tables/claims.csv is read from here
    tables = tmp_path / "results" / "tables"
    tables.mkdir(parents=True)
    pd.DataFrame([{"claim": "a", "notebook": "02_main", "statement": "A beats B", "source": "paper",
                   "metric": "seg_miou_fg", "better": "A", "worse": "B", "n_seeds": 3, "mean_difference": 0.05,
                   "interval": "seeds [+0.01, +0.09]", "verdict": "demonstrated", "scale": "demonstration"},
                  {"claim": "b", "notebook": "07_other", "statement": "C beats D", "source": "paper",
                   "metric": "cls_accuracy", "better": "C", "worse": "D", "n_seeds": 3, "mean_difference": -0.2,
                   "interval": "seeds [-0.3, -0.1]", "verdict": "reversed", "scale": "demonstration"}]
                 ).to_csv(tables / "claims.csv", index=False)
    exp = Experiment("02_main", scale="test", out_dir=str(tmp_path / "out"), runs_dir=str(tmp_path / "runs"),
                     progress=None)
    assert Experiment.committed_claims("02_main")["statement"].tolist() == ["A beats B"]
    assert len(Experiment.committed_claims()) == 2
    html = exp.show_committed_claims().to_html()
    assert "A beats B" in html and "C beats D" not in html and "#cde8cd" in html  # the demonstrated colour
    assert Experiment("09_none", scale="test", out_dir=str(tmp_path / "o9"), runs_dir=str(tmp_path / "runs"),
                      progress=None).show_committed_claims() is None
