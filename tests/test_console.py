"""The training console (issue 23): a run's start line, one line per epoch, resume and early stopping, quiet and
verbose, device=auto's choice, and the command line's log lines in a non-interactive (cluster) log."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from endoarss_lib import train
from endoarss_lib.config import preset
from endoarss_lib.training import console, engine
from endoarss_lib.training.engine import describe_device, fit, make_datasets, resolve_device, run_dir

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=56, synthetic_n_train=12, synthetic_n_test=6, batch_size=6, progress=False,
            model={"backbone": "vit_tiny_patch14", "arch": "tesla"})
# epoch i/N | train loss <task> <x> ... | <split> <metric> <x> ... [score <x>] [(best)] | <time>[, ETA <time>]
EPOCH = re.compile(r"^epoch (\d+)/(\d+) \| train loss (.+?) \| val (.+?) \| ([^|]+)$")
NUMBER = r"(-?\d+\.\d+|nan|inf|-inf)"


def tiny(tmp_path, **overrides):
    return preset("smoke", out_dir=str(tmp_path / "runs"), **{**TINY, **overrides})


def messages(caplog, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("endoarss_lib") and r.levelno == level]


def pairs(text: str) -> dict[str, float]:
    """``"cls 1.2 seg 0.5"`` -> ``{"cls": 1.2, "seg": 0.5}`` (every name followed by a number)."""
    found = re.findall(r"(\w+) " + NUMBER, text)
    assert found and len(found) * 2 == len(text.replace(" (best)", "").split()), text
    return {k: float(v) for k, v in found}


def expected_device_text() -> str:
    return "device cuda:" if torch.cuda.is_available() else "device cpu (auto: "


@pytest.fixture(autouse=True)
def _no_console_left():
    """Every test leaves the package logger as it found it (no handler of ours, level unset)."""
    yield
    console.hide_progress()


def test_package_logger_has_a_null_handler_and_no_console_by_default():
    # in a fresh interpreter: in this one, an earlier test on the same worker may have shown progress (Experiment does)
    probe = ("import logging, endoarss_lib; from endoarss_lib.training import console, engine; "
             "h = logging.getLogger('endoarss_lib').handlers; "
             "print(any(type(x) is logging.NullHandler for x in h), any(isinstance(x, console._StderrHandler) "
             "for x in h), logging.getLogger('endoarss_lib').level)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "False", "0"]


def test_experiment_shows_progress_unless_told_not_to(tmp_path):
    from endoarss_lib.experiments.experiment import Experiment

    console.hide_progress()
    Experiment("console_probe", scale="test", out_dir=str(tmp_path / "out"), progress=None)
    assert console.shown_level() is None  # None: logging left as it was
    Experiment("console_probe", scale="test", out_dir=str(tmp_path / "out"), progress="quiet")
    assert console.shown_level() == logging.WARNING
    Experiment("console_probe", scale="test", out_dir=str(tmp_path / "out"))
    assert console.shown_level() == logging.INFO  # the default: the start and epoch lines


def test_start_epoch_resume_and_early_stop_lines(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="endoarss_lib")
    cfg = tiny(tmp_path, epochs=3, patience=1, stop_after_epochs=1)
    stopped = fit(cfg)
    assert stopped["status"] == "stopped"
    first = messages(caplog)
    folder = run_dir(cfg)
    starts = [m for m in first if m.startswith("start: ")]
    assert len(starts) == 1, first
    assert f"run {folder} |" in starts[0] and expected_device_text() in starts[0]
    sizes = {s: len(d) for s, d in make_datasets(cfg).items()}
    assert f"data mtlesd (train {sizes['train']}, val {sizes['val']}, test {sizes['test']} images)" in starts[0]
    assert "model vit_tiny_patch14 tesla, tasks cls+seg" in starts[0] and "3 epochs, batch 6" in starts[0]
    trainable, total = map(lambda s: int(s.replace(",", "")),
                           re.search(r"parameters ([\d,]+) trainable of ([\d,]+)", starts[0]).groups())
    assert 0 < trainable < total  # the tiny ViT's patch embedding stays frozen, the LoRA and heads train
    assert any(m.startswith("stopped after epoch 1/3") for m in first)

    # resumed with a selection score that never improves: patience=1 stops after epoch 2 of 3
    caplog.clear()
    monkeypatch.setattr(engine, "selection_score", lambda metrics, key: -1.0)
    row = fit(tiny(tmp_path, epochs=3, patience=1))
    second = messages(caplog)
    assert [m for m in second if m.startswith(("start", "resume"))] == [
        next(m for m in second if m.startswith("resume from epoch 1/3: run "))]
    assert any(m.startswith("early stop after epoch 2/3") and "patience=1" in m for m in second), second
    assert any(m.startswith("done: 2 epochs trained") and str(folder / "result.json") in m for m in second)
    assert row["epochs_trained"] == 2 and row["best_epoch"] == 1

    lines = [EPOCH.match(m) for m in first + second if m.startswith("epoch ")]
    assert all(lines) and [int(m.group(1)) for m in lines] == [1, 2]  # one line per epoch trained, none for 3
    assert all(int(m.group(2)) == 3 for m in lines)
    log = pd.read_csv(folder / "log.csv")  # the numbers of each line are those the run recorded
    for m, (_, rec) in zip(lines, log.iterrows()):
        losses, metrics = pairs(m.group(3)), pairs(m.group(4))
        assert set(losses) == {"cls", "seg"} and all(math.isfinite(v) for v in losses.values())
        assert losses["cls"] == pytest.approx(rec["train_loss_cls"], abs=6e-5)
        assert losses["seg"] == pytest.approx(rec["train_loss_seg"], abs=6e-5)
        assert metrics["cls_accuracy"] == pytest.approx(rec["val_cls_accuracy"], abs=6e-5)
        assert metrics["seg_miou"] == pytest.approx(rec["val_seg_miou"], abs=6e-5)
        assert metrics["score"] == pytest.approx(rec["select_score"], abs=6e-5)
        assert all(math.isfinite(v) for v in metrics.values())
    assert "(best)" in lines[0].group(4) and "(best)" not in lines[1].group(4)
    time_eta = r"(\d+\.\d s|\d+ min \d\d s), ETA (\d+\.\d s|\d+ min \d\d s)"
    assert re.fullmatch(time_eta, lines[0].group(5).strip())  # epoch time, and an ETA: 2 epochs left
    assert re.fullmatch(time_eta, lines[1].group(5).strip())  # 1 left (the early stop follows the line)


def test_quiet_keeps_warnings_only_and_verbose_adds_debug(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="endoarss_lib")
    cfg = tiny(tmp_path, stop_after_epochs=0)  # builds the run and stops before training: the start line only
    with console.showing_progress("quiet"):
        fit(cfg)
        assert not console.bars_wanted(True)
    assert not [r for r in caplog.records if r.name.startswith("endoarss_lib") and r.levelno < logging.WARNING]
    assert "start:" not in capsys.readouterr().err
    assert logging.getLogger("endoarss_lib").level == logging.DEBUG  # showing_progress restored caplog's level

    caplog.clear()
    with console.showing_progress("info"):
        fit(cfg)
    err = capsys.readouterr().err
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO start: run ", err, re.M), err
    assert " DEBUG " not in err

    with console.showing_progress("verbose"):
        fit(cfg)
    err = capsys.readouterr().err
    assert f" DEBUG config {cfg.results_hash()}: " in err and " DEBUG loader: " in err


def test_bars_only_where_someone_watches(monkeypatch):
    monkeypatch.setattr(console, "_interactive", lambda: True)
    assert console.bars_wanted(True) and not console.bars_wanted(False)
    console.show_progress("quiet")
    assert not console.bars_wanted(True)
    console.show_progress("info")
    assert console.bars_wanted(True)
    monkeypatch.setattr(console, "_interactive", lambda: False)
    assert not console.bars_wanted(True)


def test_show_progress_installs_one_handler_and_names_bad_levels():
    logger = logging.getLogger("endoarss_lib")
    console.show_progress()
    console.show_progress("verbose")
    assert sum(isinstance(h, console._StderrHandler) for h in logger.handlers) == 1
    assert logger.level == logging.DEBUG
    with pytest.raises(ValueError, match="level='loud'.*debug, verbose, info, warning, quiet"):
        console.show_progress("loud")
    console.hide_progress()
    assert not any(isinstance(h, console._StderrHandler) for h in logger.handlers) and logger.level == logging.NOTSET


def _cuda(monkeypatch, available: bool, build: str | None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(engine, "_NO_GPU_WARNED", [])
    monkeypatch.setattr(engine, "_ANNOUNCED", set())


def test_device_auto_says_what_it_chose_and_warns_once_on_a_cuda_build_without_gpu(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="endoarss_lib")
    _cuda(monkeypatch, available=False, build="12.1")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    assert messages(caplog) == ["device=auto: cpu (auto: no CUDA device)"]  # INFO once, DEBUG afterwards
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and "CUDA 12.1 build but finds no usable GPU" in warnings[0]
    assert "device=cpu" in warnings[0]

    caplog.clear()
    _cuda(monkeypatch, available=False, build=None)  # a CPU-only build: the CPU is expected, no warning
    assert resolve_device("auto") == torch.device("cpu")
    assert messages(caplog) == [f"device=auto: cpu (auto: torch {torch.__version__} is a CPU-only build)"]
    assert not messages(caplog, logging.WARNING)

    caplog.clear()
    _cuda(monkeypatch, available=True, build="12.1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA Test GPU")
    assert describe_device("auto") == (torch.device("cuda"), "cuda:0 (NVIDIA Test GPU, auto: CUDA available)")
    assert resolve_device("auto") == torch.device("cuda")  # the same device object as before (no index)
    assert not messages(caplog, logging.WARNING)

    caplog.clear()
    assert resolve_device("cpu") == torch.device("cpu") and not caplog.records  # an explicit device: nothing said
    assert describe_device("cpu")[1] == "cpu (device=cpu)"


def test_cli_quiet_and_verbose_and_the_handler_is_removed_after_main(tmp_path, capsys):
    common = ["--preset", "smoke", "stop_after_epochs=0", "image_size=56", "synthetic_n_train=12",
              "synthetic_n_test=6", "model.backbone=vit_tiny_patch14", "device=cpu", f"out_dir={tmp_path / 'runs'}"]
    assert train.main(["--quiet", *common]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "stopped" and " INFO " not in err and "start:" not in err
    assert train.main(["--verbose", *common]) == 0
    err = capsys.readouterr().err
    assert " INFO start: run " in err and " DEBUG config " in err
    logger = logging.getLogger("endoarss_lib")
    assert not any(isinstance(h, console._StderrHandler) for h in logger.handlers) and logger.level == logging.NOTSET
    with pytest.raises(SystemExit):  # --quiet and --verbose exclude each other
        train.main(["--quiet", "--verbose", *common])


def test_cli_log_lines_on_stderr_in_a_non_tty_log(tmp_path):
    out_dir = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "endoarss_lib.train", "--preset", "smoke", "epochs=1",
                           "image_size=56", "synthetic_n_train=12", "synthetic_n_test=6", "batch_size=6",
                           "model.backbone=vit_tiny_patch14", f"out_dir={out_dir}"],
                          cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)  # stdout holds the result row only
    lines = done.stderr.splitlines()
    start = [x for x in lines if " INFO start: run " in x]
    assert len(start) == 1 and f"run {row['run_dir']} |" in start[0] and expected_device_text() in start[0]
    epochs = [x for x in lines if " INFO epoch " in x]
    assert len(epochs) == 1 and " INFO epoch 1/1 | train loss cls " in epochs[0]
    assert any(" INFO done: 1 epoch trained" in x for x in lines)
    assert "\r" not in done.stderr  # no progress bar redraws in a log file (progress=true is the preset's default)


def test_a_local_pools_workers_show_the_lines_as_their_owner_does():
    from endoarss_lib.training.runner import process_pool

    assert console.shown_level() is None
    console.show_progress("verbose")
    with process_pool(1) as pool:
        assert pool.submit(console.shown_level).result(timeout=300) == logging.DEBUG
