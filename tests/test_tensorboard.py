"""Live curves: a run with tensorboard=true writes an event file whose scalars are the run's own numbers."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from endoarss_lib.config import ConfigError, preset
from endoarss_lib.training.engine import fit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

SMALL = dict(image_size=56, synthetic_n_train=20, synthetic_n_test=6, batch_size=6, epochs=1, progress=False,
             model={"backbone": "vit_tiny_patch14", "arch": "tesla"})
CLOSE = dict(rel=1e-6, abs=1e-6)  # TensorBoard stores float32


def _scalars(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}


def test_a_tiny_run_logs_losses_weights_validation_metrics_and_conflict(tmp_path):
    pytest.importorskip("tensorboard")
    row = fit(preset("smoke", out_dir=str(tmp_path), tensorboard=True, weighting="db_mtl", diagnostics_every=1,
                     **SMALL))
    folder = Path(row["run_dir"]) / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*"))
    scalars = _scalars(folder)
    log = pd.read_csv(Path(row["run_dir"]) / "log.csv")
    diagnostics = pd.read_csv(Path(row["run_dir"]) / "diagnostics.csv")
    steps = len(diagnostics)  # diagnostics_every=1: one row per optimisation step
    assert steps >= 2
    for task in ("cls", "seg"):
        losses = [e.value for e in scalars[f"train/loss_{task}"]]
        assert [e.step for e in scalars[f"train/loss_{task}"]] == list(range(1, steps + 1))
        assert sum(losses) / steps == pytest.approx(log[f"train_loss_{task}"][0], **CLOSE)  # epoch mean
        weights = [e.value for e in scalars[f"train/weight_{task}"]]
        assert len(weights) == steps and all(w > 0 for w in weights)
    assert [e.value for e in scalars["conflict/cosine"]] == pytest.approx(diagnostics["cosine"].tolist(), **CLOSE)
    validation = [c for c in log.columns if c.startswith("val_") and math.isfinite(log[c][0])]
    assert {"val_cls_accuracy", "val_seg_miou"} <= set(validation)
    for column in validation:
        events = scalars[f"val/{column[len('val_'):]}"]
        assert [e.step for e in events] == [1] and events[0].value == pytest.approx(log[column][0], **CLOSE)
    assert scalars["epoch/train_loss_seg"][0].value == pytest.approx(log["train_loss_seg"][0], **CLOSE)
    assert scalars["test/seg_miou"][0].value == pytest.approx(row["test_seg_miou"], **CLOSE)


def test_without_tensorboard_installed_the_error_names_the_field_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    cfg = preset("smoke", out_dir=str(tmp_path), tensorboard=True, **SMALL)
    with pytest.raises(ConfigError, match=r"tensorboard=true.*pip install tensorboard"):
        fit(cfg)
    assert not (tmp_path / "runs").exists() and not any(tmp_path.iterdir())  # failed before writing anything


def test_the_flag_does_not_change_the_results(tmp_path):
    assert preset("smoke", tensorboard=True).results_hash() == preset("smoke").results_hash()
