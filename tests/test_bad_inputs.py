"""Bad inputs (issues 13 and 21): never a silently wrong result, nothing a user made is lost, every error names its
culprit.

:data:`CASES` is a table of bad inputs across data, weights, checkpoints, configs, the command lines, the sweep and
the notebook helper. Each case is a small function that sets up one bad input in its own folder, declares what the
error must name (:meth:`World.names`: the file or the parameter), what must stay byte-identical
(:meth:`World.keep`) or must not be created (:meth:`World.absent`), and then makes the call that must fail;
:func:`test_bad_input` checks the error type, the culprit and the files. The tests after the table check the
behaviour behind the fixes: 16-bit images scaled by hand-computed values, model selection by HD95, validation of
1-based masks with an ``id_map.json``, pool workers dying with a killed parent, the sweep lock, stale temporaries;
and (issue 21) text fields that keep their text, one canonical spelling of names, dotted keys, ``~`` in paths, a run
folder that was moved, 255 "ignore" regions, a synthetic generation killed with SIGKILL, trainings started together
into one run folder, console scripts' names, versions and exit codes. The property-based tests of the override parser
and the config types are in ``test_config_properties.py``.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from endoarss_lib import evaluate as evaluate_cli_module
from endoarss_lib import train
from endoarss_lib.atomic import LockHeld, folder_lock, remove_stale_temporaries
from endoarss_lib.config import ConfigError, apply_overrides, load_config, preset
from endoarss_lib.data import DataError, MTLDataset, make_synthetic
from endoarss_lib.data import prepare
from endoarss_lib.data.io import read_image
from endoarss_lib.evaluation.inference import load_run_model
from endoarss_lib.experiments.experiment import Experiment, as_list, as_mapping
from endoarss_lib.experiments.sweep import LOCK_NAME, GridError, load_grid, run_sweep, sweep_folder
from endoarss_lib.models.weights import WeightsError, read_state_dict
from endoarss_lib.robustness.corrupted_sets import build_corrupted_set
from endoarss_lib.training.engine import (CheckpointMismatch, RunError, checkpoint_info, fit, read_run_config, run_dir,
                                          selection_score)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 56
TINY = {"backbone": "vit_tiny_patch14", "pretrained": False}
NEVER_SAID = ("weights_only=False", "delete")  # no error advises unpickling a file or deleting what a user made


# ------------------------------------------------------------------------------------------------ shared inputs

@dataclass
class Shared:
    """Inputs made once per module: a tiny synthetic set, two weight files, an interrupted and a finished run."""

    root: Path
    data: Path
    weights_a: Path
    weights_b: Path
    interrupted: Path  # run folder (epochs=2, stopped after 1) on `data`
    finished: Path  # run folder (epochs=1) on `data`


def tiny_config(data: Path, out_dir: Path, **overrides):
    """A 1-epoch run of the test-size ViT on 56 px images of a prepared folder (the synthetic set, as real data)."""
    values = dict(data_root=str(data), synthetic=False, out_dir=str(out_dir), run_name="run", image_size=SIZE,
                  epochs=1, batch_size=6, progress=False, model=dict(TINY))
    values.update(overrides)
    return preset("smoke", **values)


def vit_tiny_weights(path: Path, seed: int) -> Path:
    """A state dict for backbone ``vit_tiny_patch14`` (timm's DINOv2 class, width 64, 3 blocks), as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=SIZE, num_classes=0,
                              dynamic_img_size=True, embed_dim=64, depth=3, num_heads=2, init_values=1.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("bad_inputs")
    data = make_synthetic(root / "data", "mtlesd", seed=0, n_train=12, n_test=6, image_size=SIZE)
    weights_a = vit_tiny_weights(root / "a.safetensors", 0)
    weights_b = vit_tiny_weights(root / "b.safetensors", 1)
    fit(tiny_config(data, root / "interrupted", epochs=2, stop_after_epochs=1))
    fit(tiny_config(data, root / "finished"))
    return Shared(root, data, weights_a, weights_b, root / "interrupted" / "run", root / "finished" / "run")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class CommandError(Exception):
    """A command line that exited with an error: its exit code and what it printed."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


class ValidationFailed(Exception):
    """``validate`` found problems (the message: every problem, one a line)."""


class World:
    """One case's folder, its declared culprits and the files it must leave as they were."""

    def __init__(self, shared: Shared, tmp: Path):
        self.shared, self.tmp = shared, tmp
        self.culprits: list[str] = []
        self.forbidden: list[str] = list(NEVER_SAID)
        self.kept: dict[Path, dict] = {}
        self.absent_paths: list[Path] = []
        self._data: Path | None = None

    # -- declarations
    def names(self, *culprits) -> None:
        """The error must contain each of these (a path or a parameter)."""
        self.culprits += [str(c) for c in culprits]

    def forbid(self, *texts: str) -> None:
        """The error must not contain these."""
        self.forbidden += texts

    def keep(self, *folders: Path) -> None:
        """Every file under these folders must be byte-identical after the failed call."""
        for folder in folders:
            self.kept[Path(folder)] = snapshot(folder)

    def absent(self, *paths: Path) -> None:
        """These paths must not exist after the failed call."""
        self.absent_paths += [Path(p) for p in paths]

    # -- inputs
    def data(self) -> Path:
        """This case's own copy of the shared dataset."""
        if self._data is None:
            self._data = Path(shutil.copytree(self.shared.data, self.tmp / "data"))
        return self._data

    def config(self, **overrides):
        return tiny_config(self.data(), self.tmp / "runs", **overrides)

    def copy_run(self, folder: Path) -> Path:
        """A shared run folder copied under this case's out_dir (out_dir and run_name are not in the run's hash)."""
        return Path(shutil.copytree(folder, self.tmp / "runs" / "run"))

    def shared_config(self, **overrides):
        """The config of the shared runs (shared data), writing under this case's out_dir."""
        return tiny_config(self.shared.data, self.tmp / "runs", **overrides)


def first(root: Path, split: str, kind: str = "image", activity: int = 1) -> Path:
    return sorted((root / split / str(activity) / kind).glob("*.png"))[0]


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def cli(*argv: str) -> None:
    """``python -m endoarss_lib.train ... --print-config`` in this process: CommandError(2, stderr) on failure."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = train.main([*argv, "--print-config"])
    if code:
        assert code == 2, code
        raise CommandError(code, err.getvalue())


def train_cli(w: World, *argv: str, expect: int) -> None:
    """``python -m endoarss_lib.train ...`` (a run, tiny and writing under the case's folder) in this process:
    CommandError(code, stderr) on failure, with no traceback. ``argv`` may replace the tiny defaults (out_dir=...)."""
    given = {a.split("=", 1)[0] for a in argv if "=" in a}
    small = [a for a in ["image_size=56", "epochs=1", "progress=false", "model.backbone=vit_tiny_patch14",
                         "model.pretrained=false", f"out_dir={w.tmp / 'runs'}"] if a.split("=", 1)[0] not in given]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train.main([*small, *argv])
    if code:
        assert code == expect, (code, err.getvalue())
        assert "Traceback" not in err.getvalue()
        raise CommandError(code, err.getvalue())


def prepare_cli(*argv: str, expect: int) -> None:
    """``python -m endoarss_lib.data.prepare ...`` in this process: CommandError(code, output) on failure."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = prepare.main(list(argv))
    if code:
        assert code == expect, (code, out.getvalue(), err.getvalue())
        raise CommandError(code, out.getvalue() + err.getvalue())


def evaluate_cli(*argv: str, expect: int) -> None:
    """``python -m endoarss_lib.evaluate ...`` in this process: CommandError(code, stderr) on failure, no traceback."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = evaluate_cli_module.main(list(argv))
    assert code == expect, (code, err.getvalue())
    assert "Traceback" not in err.getvalue()
    raise CommandError(code, err.getvalue())


def validated(root: Path, **kwargs) -> None:
    """``validate`` without writing index.json; ValidationFailed listing every problem if any."""
    report = prepare.validate(root, "mtlesd", write_index=False, **kwargs)
    if not report.ok:
        raise ValidationFailed("\n".join(report.problems))


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------------------ the table

@dataclass(frozen=True)
class Case:
    name: str
    error: type | tuple
    body: Callable[[World], object]


CASES: list[Case] = []


def case(error):
    """Register the decorated function as a bad-input case that must raise ``error``."""
    def register(body):
        CASES.append(Case(body.__name__, error, body))
        return body
    return register


def cli_case(name: str, *argv: str, culprits: tuple = (), forbid: tuple = ()) -> None:
    """A command-line override that must exit with status 2 naming its field."""
    def body(w: World):
        w.names(*culprits)
        w.forbid(*forbid)
        cli(*argv)
    CASES.append(Case(name, CommandError, body))


# --- config and command line: exit status 2, the field named on stderr
cli_case("cli_augment_flase", "augment=flase", culprits=("augment",))
cli_case("cli_amp_unknown", "amp=maybe", culprits=("amp",))
cli_case("cli_epochs_text", "epochs=abc", culprits=("epochs",))
cli_case("cli_lr_text", "lr=abc", culprits=("lr=",))
cli_case("cli_seed_text", "seed=abc", culprits=("seed",))
cli_case("cli_epochs_fraction", "epochs=2.5", culprits=("epochs",))
cli_case("cli_select_metric_unknown", "select_metric=seg_nonsense", culprits=("select_metric",))
cli_case("cli_select_hd95_without_distances", "select_metric=seg_hd95",
         culprits=("select_metric", "eval_distances_on_val"))
cli_case("cli_model_num_seg_classes", "model.num_seg_classes=3", culprits=("model.num_seg_classes",))
cli_case("cli_dataset_unknown", "dataset=foo", culprits=("dataset='foo'",), forbid=("preset=",))
cli_case("cli_dataset_evaluation_only", "dataset=mtlendovis_gen", culprits=("dataset='mtlendovis_gen'",))
cli_case("cli_unknown_field", "unknownfield=1", culprits=("unknownfield",))
cli_case("cli_override_without_value", "epochs", culprits=("epochs",))
cli_case("cli_batch_size_zero", "batch_size=0", culprits=("batch_size",))
cli_case("cli_image_size_not_multiple", "image_size=50", culprits=("image_size=50",))
cli_case("cli_backbone_unknown", "model.backbone=vit_huge", culprits=("backbone", "vit_huge"))
cli_case("cli_arch_unknown", "model.arch=foo", culprits=("arch",))
cli_case("cli_weighting_unknown", "weighting=foo", culprits=("weighting",))
cli_case("cli_weighting_hparam_unknown", "weighting_hparams={bogus: 1}", culprits=("weighting_hparams", "bogus"))
cli_case("cli_val_fraction_out_of_range", "val_fraction=1.5", culprits=("val_fraction",))
cli_case("cli_device_unknown", "device=tpu", culprits=("device",))
cli_case("cli_scheduler_unknown", "scheduler=linear", culprits=("scheduler",))
cli_case("cli_loss_weight_unknown_task", "loss_weights={cls: 1, foo: 2}", culprits=("loss_weights", "foo"))
cli_case("cli_id_map_unknown", "id_map=weird", culprits=("id_map",))
cli_case("cli_missing_config_file", "--config", "/nonexistent/run.yaml", culprits=("/nonexistent/run.yaml",))


@case(CommandError)
def cli_config_file_with_bad_value(w):
    path = write_yaml(w.tmp / "run.yaml", "preset: smoke\naugment: flase\n")
    w.names(path, "augment")
    cli("--config", str(path))


@case(CommandError)
def cli_config_file_not_a_mapping(w):
    path = write_yaml(w.tmp / "run.yaml", "- epochs\n- 3\n")
    w.names(path)
    cli("--config", str(path))


@case(CommandError)
def cli_run_data_root_missing(w):
    w.names(w.tmp / "nowhere")
    train_cli(w, "synthetic=false", f"data_root={w.tmp / 'nowhere'}", expect=1)


@case(CommandError)
def cli_run_synthetic_false_without_data_root(w):
    w.names("data_root", "synthetic=false")
    train_cli(w, "synthetic=false", expect=2)


@case(CommandError)
def cli_run_real_data_with_synthetic_true(w):
    root = w.data()
    (root / "dataset_card.json").unlink()
    w.names(root, "synthetic=false")
    w.keep(root)
    train_cli(w, f"data_root={root}", expect=1)


# --- the notebook helper: fails at construction naming the notebook's parameter, makes no output folder
def experiment_case(name: str, parameter: str, forbid: tuple = (), **kwargs) -> None:
    def body(w: World):
        w.names(parameter)
        w.forbid(*forbid)
        w.absent(w.tmp / "exp")
        Experiment("nb", out_dir=w.tmp / "exp", **kwargs)
    CASES.append(Case(name, ConfigError, body))


experiment_case("experiment_dataset_unknown", "dataset='foo'", dataset="foo", forbid=("preset=",))
experiment_case("experiment_image_size_not_multiple", "image_size=50", image_size=50)
experiment_case("experiment_image_size_text", "image_size", image_size="big")
experiment_case("experiment_epochs_zero", "epochs=0", epochs=0)
experiment_case("experiment_epochs_text", "epochs", epochs="abc")
experiment_case("experiment_n_train_negative", "n_train=-1", forbid=("synthetic_n_train",), n_train=-1)
experiment_case("experiment_n_train_fraction", "n_train", forbid=("synthetic_n_train",), n_train=2.5)
experiment_case("experiment_n_test_zero", "n_test=0", forbid=("synthetic_n_test",), n_test=0)
experiment_case("experiment_model_label", "model=", model="vit_tiny_patch14+foo")
experiment_case("experiment_preset_unknown", "preset_name", preset_name="fast")
experiment_case("experiment_device_unknown", "device", device="gpu")


# --- data: the loader and validate name the file
@case(DataError)
def loader_truncated_png(w):
    image = truncate(first(w.data(), "test"))
    w.names(image, "validate")
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)[0]


@case(ValidationFailed)
def validate_truncated_png(w):
    image = truncate(first(w.data(), "test", activity=2))  # the header stays readable: only a full decode fails
    w.names(image)
    validated(w.data())


@case(ValidationFailed)
def validate_random_bytes_image(w):
    image = first(w.data(), "train", activity=3)
    image.write_bytes(os.urandom(500))
    w.names(image)
    validated(w.data())


@case(DataError)
def loader_empty_image(w):
    image = first(w.data(), "test")
    image.write_bytes(b"")
    w.names(image)
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)[0]


@case(ValidationFailed)
def validate_colour_mask(w):
    mask = first(w.data(), "train", "mask")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(mask)
    w.names(mask, "colour")
    validated(w.data())


@case(DataError)
def loader_one_bit_mask(w):
    mask = first(w.data(), "test", "mask")
    Image.fromarray(np.zeros((SIZE, SIZE), bool)).save(mask)
    w.names(mask, "1-bit")
    w.forbid("(colour)")
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)[0]


@case(ValidationFailed)
def validate_mask_id_outside_the_map(w):
    mask = first(w.data(), "train", "mask", activity=2)
    Image.fromarray(np.full((SIZE, SIZE), 9, np.uint8), mode="L").save(mask)
    w.names(mask, "[9]", "id_map")
    validated(w.data())


@case(DataError)
def loader_mask_size_mismatch(w):
    mask = first(w.data(), "test", "mask")
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(mask)
    w.names(mask)
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)[0]


@case(DataError)
def loader_image_without_mask(w):
    mask = first(w.data(), "test", "mask", activity=3)
    mask.unlink()
    w.names(mask.parents[1] / "image" / mask.name)
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(DataError)
def loader_mask_without_image(w):
    image = first(w.data(), "test", activity=2)
    image.unlink()
    w.names(image.parents[1] / "mask" / image.name)
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(DataError)
def loader_empty_activity_folder(w):
    folder = w.data() / "test" / "2"
    for path in folder.rglob("*.png"):
        path.unlink()
    w.names(folder / "image")
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(DataError)
def loader_unknown_activity_folder(w):
    shutil.copytree(w.data() / "test" / "1", w.data() / "test" / "9")
    w.names(w.data() / "test", "'9'")
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(DataError)
def loader_missing_split(w):
    shutil.rmtree(w.data() / "test")
    w.names(w.data() / "test")
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(DataError)
def loader_missing_root(w):
    w.names(w.tmp / "nowhere")
    MTLDataset(w.tmp / "nowhere", "test", dataset="mtlesd", image_size=SIZE)


@case(DataError)
def loader_duplicate_image_name(w):
    image = first(w.data(), "test")
    shutil.copyfile(image, image.with_suffix(".jpg"))
    w.names(image.with_suffix(""), "share the name")
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(DataError)
def loader_id_map_file_not_json(w):
    path = w.data() / "id_map.json"
    path.write_text("{raw_to_train: ")
    w.names(path, "raw_to_train")
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(DataError)
def loader_id_map_file_out_of_range(w):
    path = w.data() / "id_map.json"
    path.write_text(json.dumps({"raw_to_train": {str(k): k for k in range(7)} | {"7": 12}}))
    w.names(path, "12")
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(ValidationFailed)
def validate_reads_id_map_file_as_training(w):
    path = w.data() / "id_map.json"
    path.write_text(json.dumps({"train": {}}))
    w.names(path)
    validated(w.data())


@case(DataError)
def loader_card_not_json(w):
    card = w.data() / "dataset_card.json"
    card.write_text("{")
    w.names(card)
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(DataError)
def loader_card_of_another_dataset(w):
    card = w.data() / "dataset_card.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "dataset": "synthetic_mtlendovis"}))
    w.names(card, "dataset='mtlesd'")
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(ValidationFailed)
def validate_one_based_masks_without_id_map(w):
    mask = first(w.data(), "test", "mask")
    raw = np.asarray(Image.open(mask)).astype(np.uint8)
    Image.fromarray(raw + 1, mode="L").save(mask)  # 1..7: 7 is outside the identity map of 7 classes
    if 7 not in np.unique(raw + 1):
        Image.fromarray(np.full_like(raw, 7), mode="L").save(mask)
    w.names(mask, "id_map.json")
    validated(w.data())


@case(ValidationFailed)
def validate_reports_every_problem_in_one_pass(w):
    root = w.data()
    shutil.copytree(root / "train" / "1", root / "train" / "9")  # 1: unknown activity folder
    no_mask = first(root, "train", "mask", activity=1)
    no_mask.unlink()  # 2: image without a mask
    no_image = first(root, "train", "image", activity=2)
    no_image.unlink()  # 3: mask without an image
    duplicate = first(root, "train", "image", activity=3)
    shutil.copyfile(duplicate, duplicate.with_suffix(".jpg"))  # 4: two images, one name
    shutil.rmtree(root / "test" / "1" / "mask")  # 5: missing mask folder
    broken = truncate(first(root, "test", activity=2))  # 6: undecodable image
    w.names(root / "train", "'9'", no_mask.parents[1] / "image" / no_mask.name,
            no_image.parents[1] / "mask" / no_image.name, duplicate.with_suffix(""), root / "test" / "1" / "mask",
            broken)
    validated(root)


@case(CommandError)
def validate_cli_bad_id_map_file(w):
    path = w.tmp / "map.json"
    path.write_text("[1, 2]")
    w.names(path)
    prepare_cli("validate", str(w.data()), "--dataset", "mtlesd", "--id-map", str(path), expect=2)


@case(CommandError)
def validate_cli_exit_1_names_the_file(w):
    image = truncate(first(w.data(), "train"))
    w.names(image)
    prepare_cli("validate", str(w.data()), "--dataset", "mtlesd", "--no-index", expect=1)


# --- real data given as data_root with synthetic=true: nothing generated over it
@case(FileExistsError)
def data_root_real_dataset_with_synthetic_true(w):
    root = w.data()
    (root / "dataset_card.json").unlink()  # now a real dataset: train/, test/, no synthetic card
    w.names(root, "synthetic=false")
    w.forbid("overwrite=True to")
    w.keep(root)
    fit(w.config(synthetic=True))


@case(FileExistsError)
def make_synthetic_overwrite_refuses_real_data(w):
    root = w.data()
    (root / "dataset_card.json").unlink()
    w.names(root, "synthetic=false")
    w.keep(root)
    make_synthetic(root, "mtlesd", seed=0, n_train=12, n_test=6, image_size=SIZE, overwrite=True)


@case(FileExistsError)
def make_synthetic_overwrite_refuses_a_foreign_folder(w):
    root = w.tmp / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep")
    w.names(root)
    w.keep(root)
    make_synthetic(root, "mtlesd", seed=0, n_train=3, n_test=3, image_size=SIZE, overwrite=True)


# --- runs whose data changed: refused, the run folder left as it is
@case(RunError)
def finished_run_test_image_deleted(w):
    cfg = w.config()
    fit(cfg)
    first(w.data(), "test").unlink()
    first(w.data(), "test", "mask").unlink()
    folder = run_dir(cfg)
    w.names(folder / "result.json", "test", "restore the data")
    w.keep(folder)
    fit(cfg)


@case(RunError)
def interrupted_run_train_image_changed(w):
    cfg = w.config(epochs=2)
    fit(cfg.replace(stop_after_epochs=1))
    image = first(w.data(), "train", activity=2)
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(image)
    folder = run_dir(cfg)
    w.names(folder / "last.pt", "train")
    w.keep(folder)
    fit(cfg)


@case(CheckpointMismatch)
def rerun_folder_with_changed_config(w):
    w.copy_run(w.shared.interrupted)
    folder = w.tmp / "runs" / "run"
    w.names(folder, "run_name")
    w.keep(folder)
    fit(w.shared_config(epochs=2, lr=1e-4))


@case(RunError)
def run_folder_config_json_damaged(w):
    folder = w.copy_run(w.shared.interrupted)
    (folder / "config.json").write_text("{not json")
    w.names(folder / "config.json")
    w.keep(folder)
    fit(w.shared_config(epochs=2))


# --- weights files: WeightsError naming the file, saying what it is not
@case(WeightsError)
def weights_truncated_safetensors(w):
    path = truncate(Path(shutil.copyfile(w.shared.weights_a, w.tmp / "w.safetensors")))
    w.names(path, "truncated")
    read_state_dict(path)


@case(WeightsError)
def weights_random_bytes(w):
    path = w.tmp / "w.pth"
    path.write_bytes(os.urandom(4096))
    w.names(path, "not a torch or safetensors file")
    read_state_dict(path)


@case(WeightsError)
def weights_pickled_module(w):
    path = w.tmp / "w.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    w.names(path, "pickled", "state_dict()")
    read_state_dict(path)


@case(WeightsError)
def weights_empty_file(w):
    path = w.tmp / "w.pth"
    path.write_bytes(b"")
    w.names(path, "empty")
    read_state_dict(path)


@case(WeightsError)
def weights_training_checkpoint_not_a_state_dict(w):
    path = w.tmp / "w.pth"
    torch.save({"epoch": 3, "model": {"a": torch.zeros(2)}, "optimizer": {}, "lr": 0.1, "step": 9}, path)
    w.names(path, "flat state dict")
    read_state_dict(path)


@case(FileNotFoundError)
def weights_bundled_name_typo(w):
    w.names("synthdino_vit_mini14x", "synthdino_vit_mini14")
    read_state_dict("synthdino_vit_mini14x")


@case(WeightsError)
def weights_of_another_architecture_in_fit(w):
    from safetensors.torch import save_file

    path = w.tmp / "other.safetensors"
    save_file({"blocks.0.weight": torch.zeros(3, 3)}, str(path))
    w.names(path, "missing keys", "do not")
    w.forbid("accept those named keys")  # allowing the missing keys would train on a random backbone
    w.absent(w.tmp / "runs" / "run" / "config.json")
    fit(w.config(model={**TINY, "pretrained": str(path)}))


@case(WeightsError)
def weights_truncated_in_fit(w):
    path = truncate(Path(shutil.copyfile(w.shared.weights_a, w.tmp / "w.safetensors")))
    w.names(path)
    w.absent(w.tmp / "runs" / "run" / "config.json")
    fit(w.config(model={**TINY, "pretrained": str(path)}))


@case(FileNotFoundError)
def weights_missing_in_fit(w):
    path = w.tmp / "nowhere.pth"
    w.names(path)
    w.absent(w.tmp / "runs" / "run" / "config.json")
    fit(w.config(model={**TINY, "pretrained": str(path)}))


@case(CheckpointMismatch)
def weights_swapped_before_resume(w):
    weights = Path(shutil.copyfile(w.shared.weights_a, w.tmp / "backbone.safetensors"))
    cfg = w.config(epochs=2, model={**TINY, "pretrained": str(weights)})
    fit(cfg.replace(stop_after_epochs=1))
    shutil.copyfile(w.shared.weights_b, weights)  # same path, other weights
    folder = run_dir(cfg)
    w.names(weights, folder / "last.pt", "Restore")
    w.keep(folder)
    fit(cfg)


@case(CheckpointMismatch)
def weights_swapped_before_load_run_model(w):
    weights = Path(shutil.copyfile(w.shared.weights_a, w.tmp / "backbone.safetensors"))
    cfg = w.config(model={**TINY, "pretrained": str(weights)})
    fit(cfg)
    shutil.copyfile(w.shared.weights_b, weights)
    folder = run_dir(cfg)
    w.names(weights, folder / "best.pt", "Restore")
    w.keep(folder)
    load_run_model(folder)


@case(CheckpointMismatch)
def weights_swapped_after_a_finished_run(w):
    weights = Path(shutil.copyfile(w.shared.weights_a, w.tmp / "backbone.safetensors"))
    cfg = w.config(model={**TINY, "pretrained": str(weights)})
    fit(cfg)
    shutil.copyfile(w.shared.weights_b, weights)
    folder = run_dir(cfg)
    w.names(weights, folder / "result.json")
    w.keep(folder)
    fit(cfg)


# --- checkpoints: RunError naming the file; the run folder left as it is
def damaged_last_pt(name: str, damage: Callable[[Path], None], *culprits: str) -> None:
    def body(w: World):
        folder = w.copy_run(w.shared.interrupted)
        damage(folder / "last.pt")
        w.names(folder / "last.pt", "Move it away and rerun", *culprits)
        w.keep(folder)
        fit(w.shared_config(epochs=2))
    CASES.append(Case(name, RunError, body))


damaged_last_pt("checkpoint_last_empty", lambda p: p.write_bytes(b""), "empty")
damaged_last_pt("checkpoint_last_truncated", truncate, "truncated")
damaged_last_pt("checkpoint_last_random_bytes", lambda p: p.write_bytes(os.urandom(2048)), "not a torch")
damaged_last_pt("checkpoint_last_pickled_module", lambda p: torch.save(torch.nn.Linear(2, 2), p), "pickled")


@case(CheckpointMismatch)
def checkpoint_last_of_another_config(w):
    other = w.tmp / "other"
    fit(tiny_config(w.shared.data, other, epochs=2, lr=1e-4, stop_after_epochs=1))
    folder = w.copy_run(w.shared.interrupted)
    shutil.copyfile(other / "run" / "last.pt", folder / "last.pt")
    w.names(folder / "last.pt", "config")
    w.keep(folder)
    fit(w.shared_config(epochs=2))


@case(RunError)
def checkpoint_best_empty_in_load_run_model(w):
    folder = w.copy_run(w.shared.finished)
    (folder / "best.pt").write_bytes(b"")
    w.names(folder / "best.pt", "empty", "cannot be rebuilt")
    w.keep(folder)
    load_run_model(folder)


@case(RunError)
def checkpoint_best_truncated_in_load_run_model(w):
    folder = w.copy_run(w.shared.finished)
    truncate(folder / "best.pt")
    w.names(folder / "best.pt")
    w.keep(folder)
    load_run_model(folder)


@case(RunError)
def load_run_model_without_config(w):
    folder = w.copy_run(w.shared.finished)
    (folder / "config.json").unlink()
    w.names(folder / "config.json")
    w.keep(folder)
    load_run_model(folder)


@case(RunError)
def read_run_config_of_another_version(w):
    folder = w.copy_run(w.shared.finished)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "epochs": "many"}))
    w.names(path, "epochs")
    w.keep(folder)
    read_run_config(folder)


@case(RunError)
def checkpoint_info_of_a_text_file(w):
    path = w.tmp / "notes.pt"
    path.write_text("not a checkpoint")
    w.names(path)
    checkpoint_info(path)


# --- sweep grid files and the sweep lock
def grid_case(name: str, text: str, *culprits: str) -> None:
    def body(w: World):
        path = write_yaml(w.tmp / "grid.yaml", text)
        w.names(path, *culprits)
        load_grid(path)
    CASES.append(Case(name, GridError, body))


grid_case("grid_unknown_key", "notebook: a.ipynb\nparameter: {}\n", "'parameter'")
grid_case("grid_notebook_not_ipynb", "notebook: a.py\n", "'notebook'")
grid_case("grid_axis_not_a_list", "notebook: a.ipynb\naxes: {seeds: 3}\n", "'axes.seeds'")
grid_case("grid_out_dir_set", "notebook: a.ipynb\nparameters: {out_dir: x}\n", "'out_dir'")
grid_case("grid_not_yaml", "notebook: [a.ipynb\n", "cannot read")
grid_case("grid_bad_name", "name: a/b\nnotebook: a.ipynb\n", "'name'")
grid_case("grid_cell_timeout_negative", "notebook: a.ipynb\ncell_timeout: -1\n", "'cell_timeout'")
grid_case("grid_duplicate_key", "notebook: a.ipynb\nparameters: {epochs: 1}\nparameters: {epochs: 2}\n",
          "'parameters'", "line 3", "line 2")
grid_case("grid_axis_also_a_parameter", "notebook: a.ipynb\nparameters: {seed: 0}\naxes: {seed: [0, 1]}\n",
          "'axes.seed'")


def sweep_grid(root: Path) -> Path:
    """A grid of one configuration of a placeholder notebook, and a finished-looking run folder with a table."""
    (root / "nb.ipynb").write_text("{}")
    return write_yaml(root / "grid.yaml", "name: g\nnotebook: nb.ipynb\nparameters: {epochs: 1}\n")


@case(LockHeld)
def sweep_locked_by_a_live_sweep(w):
    grid = sweep_grid(w.tmp)
    folder = sweep_folder(load_grid(grid), w.tmp)
    folder.mkdir(parents=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": "sweep",
                                "started": "earlier", "token": "x"}))
    w.names(lock, f"pid {os.getpid()}")
    w.keep(w.tmp)
    run_sweep(grid, w.tmp, progress=False)


@case(CommandError)
def sweep_cli_locked(w):
    from endoarss_lib.experiments import sweep

    grid = sweep_grid(w.tmp)
    folder = sweep_folder(load_grid(grid), w.tmp)
    folder.mkdir(parents=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": "sweep"}))
    w.names(lock)
    w.keep(w.tmp)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = sweep.main([str(grid), "--root", str(w.tmp)])
    assert code == 2
    raise CommandError(code, err.getvalue())


# --- corrupted test sets
@case(ValueError)
def corrupted_set_severity_out_of_range(w):
    w.names("severity=9")
    w.absent(w.tmp / "cells")
    build_corrupted_set(w.shared.data, w.tmp / "cells", names=["gaussian_noise"], severities=[9], workers=1,
                        progress=False)


@case(ValueError)
def corrupted_set_unknown_corruption(w):
    w.names("'fog_of_war'")
    w.absent(w.tmp / "cells")
    build_corrupted_set(w.shared.data, w.tmp / "cells", names=["fog_of_war"], severities=[1], workers=1,
                        progress=False)


# ------------------------------------------------------------------------------------------------ issue 21 cases

# --- numbers that cannot train, weights that mean nothing, names that are no folder: exit 2 naming the field
cli_case("cli_lr_inf", "lr=inf", culprits=("lr=", "finite"))
cli_case("cli_lr_nan", "lr=nan", culprits=("lr=", "finite"))
cli_case("cli_gamma_minus_inf", "gamma=-inf", culprits=("gamma=", "finite"))
cli_case("cli_seed_beyond_int64", "seed=1e30", culprits=("seed=",))
cli_case("cli_loss_weight_negative", "loss_weights={cls: -1, seg: 1}", culprits=("loss_weights.cls", ">= 0"))
cli_case("cli_loss_weights_all_zero", "loss_weights={cls: 0, seg: 0}",
         culprits=("loss_weights", "weight 0", "train nothing"))
cli_case("cli_loss_weight_dotted_nan", "loss_weights.seg=nan", culprits=("loss_weights", "finite"))
cli_case("cli_loss_weight_unknown_task_dotted", "loss_weights.clss=1", culprits=("loss_weights", "did you mean 'cls'"))
cli_case("cli_weighting_hparam_inf", "weighting=db_mtl", "weighting_hparams.beta=.inf",
         culprits=("weighting_hparams.beta", "finite"))
cli_case("cli_ignore_index_is_a_class", "ignore_index=3", culprits=("ignore_index=3", "0..6", "255"))
cli_case("cli_ignore_index_zero", "ignore_index=0", culprits=("ignore_index=0", "background"))
cli_case("cli_ignore_index_beyond_int32", "ignore_index=1e12", culprits=("ignore_index=", "32-bit"))
cli_case("cli_run_name_300_characters", "run_name=" + "r" * 300, culprits=("run_name", "255 bytes"))
cli_case("cli_run_name_leaves_out_dir", "run_name=../elsewhere", culprits=("run_name", "'..'"))
cli_case("cli_run_name_absolute", "run_name=/tmp/elsewhere", culprits=("run_name", "absolute"))
cli_case("cli_released_preset_on_synthetic_masks", "--preset", "released", "synthetic=true",
         culprits=("id_map='released'", "synthetic=true", "0-based", "id_map=null"))
cli_case("cli_unknown_field_did_you_mean", "epohcs=3", culprits=("'epohcs'", "did you mean 'epochs'"))
cli_case("cli_choice_did_you_mean", "amp=bf61", culprits=("amp=", "did you mean 'bf16'"))
cli_case("cli_weighting_did_you_mean", "weighting=db_mlt", culprits=("weighting=", "did you mean 'db_mtl'"))
cli_case("cli_model_option_did_you_mean", "model.lora_rnak=2", culprits=("lora_rnak", "did you mean 'lora_rank'"))
cli_case("cli_dotted_key_into_a_number", "epochs.max=3", culprits=("'epochs'", "not a mapping"))
cli_case("cli_field_given_twice", "epochs=1", "epochs=5", culprits=("'epochs'", "twice"))
cli_case("cli_preset_as_an_override", "preset=paper", culprits=("preset=paper", "--preset"))
cli_case("cli_model_not_a_mapping", "model=hps", culprits=("model='hps'", "model.arch=hps"))
cli_case("cli_model_out_layers_not_ints", "model.out_layers=[-1, x]", culprits=("model.out_layers[1]",))
cli_case("cli_cgl_probability_nan", "cls_loss=cgl", "cls_loss_hparams.p=nan", culprits=("cls_loss_hparams.p", "finite"))
cli_case("cli_cgl_probability_above_one", "cls_loss=cgl", "cls_loss_hparams.p=2",
         culprits=("cls_loss_hparams.p", "[0, 1]"))


def yaml_case(name: str, text: str, *culprits: str) -> None:
    """A config file that ``--config`` must refuse (exit 2), naming the file and ``culprits``."""
    def body(w: World):
        path = write_yaml(w.tmp / "run.yaml", text)
        w.names(path, *culprits)
        w.keep(w.tmp)
        cli("--config", str(path))
    CASES.append(Case(name, CommandError, body))


yaml_case("yaml_duplicate_key", "preset: smoke\nepochs: 1\nlr: 0.01\nepochs: 5\n", "'epochs'", "line 4", "line 2")
yaml_case("yaml_duplicate_model_block", "preset: smoke\nmodel:\n  arch: hps\nepochs: 2\nmodel:\n  arch: tesla\n",
          "'model'", "line 5", "line 2")
yaml_case("yaml_duplicate_nested_key", "preset: smoke\nmodel: {arch: hps, sma: true, arch: tesla}\n", "'arch'")
yaml_case("yaml_lr_inf", "preset: smoke\nlr: .inf\n", "lr=", "finite")
yaml_case("yaml_unknown_field_did_you_mean", "preset: smoke\nlearning_rate: 0.1\n", "'learning_rate'",
          "did you mean 'lr'")


# --- runs: refused before anything is written, or stopped without a result row
@case(CommandError)
def train_device_cuda_without_cuda(w):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    w.names("device='cuda'", "device=cpu")
    w.absent(w.tmp / "runs")
    train_cli(w, "device=cuda", expect=2)


@case(CommandError)
def train_out_dir_is_a_file(w):
    keep = w.tmp / "mine"
    keep.mkdir()
    (keep / "runs").write_text("my notes")
    w.names(keep / "runs", "out_dir", "is a file")
    w.keep(keep)
    train_cli(w, f"out_dir={keep / 'runs'}", expect=1)


@case(CommandError)
def train_out_dir_read_only(w):
    import errno

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # as a read-only mount answers (root ignores permission bits)
        if str(self).startswith(str(w.tmp / "runs")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    w.names(w.tmp / "runs", "not writable", "writable out_dir")
    with mock.patch.object(Path, "mkdir", read_only):
        train_cli(w, expect=1)


@case(CommandError)
def train_disk_full_while_writing_a_checkpoint(w):
    def full(*args, **kwargs):  # what torch.save raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6528 vs 6416")

    usage = mock.Mock(return_value=mock.Mock(free=2 ** 20, total=2 ** 40, used=2 ** 40))
    w.names("best.pt", "disk is full", "1 MiB free", "resumes")
    w.forbid("inline_container", "Traceback")
    w.absent(w.tmp / "runs" / "run" / "result.json")
    with mock.patch("torch.save", full), mock.patch("shutil.disk_usage", usage):
        train_cli(w, "run_name=run", f"data_root={w.data()}", "synthetic=false", expect=1)


@case(RunError)
def train_diverging_learning_rate(w):
    cfg = w.config(lr=1e6, epochs=2)
    w.names(run_dir(cfg), "epoch 2", "not finite", "lr=1000000.0", "no result was written")
    w.absent(run_dir(cfg) / "result.json")
    fit(cfg)


@case(ConfigError)
def train_released_id_map_on_a_synthetic_data_folder(w):
    w.names("id_map='released'", w.data(), "synthetic", "id_map=null")
    w.absent(w.tmp / "runs" / "run")
    w.keep(w.data())
    fit(w.config(id_map="released"))


@case(CommandError)
def train_dataset_file_name_not_utf8(w):
    folder = w.data() / "test" / "1" / "image"
    with open(os.path.join(os.fsencode(folder), b"frame\xff.png"), "wb") as f:
        f.write(first(w.data(), "test").read_bytes())
    w.names(str(folder) + "/frame\\xff.png", "UTF-8", "rename")
    w.keep(w.data())
    train_cli(w, f"data_root={w.data()}", "synthetic=false", expect=1)


# --- data: lossy masks, id maps that merge classes, files where folders belong, names and sizes validate reports
def jpeg_mask(root: Path, split: str = "train") -> Path:
    """The first mask of ``split`` saved again as a JPEG file, under its .png name."""
    mask = first(root, split, "mask", activity=2)
    Image.open(mask).convert("L").save(mask, format="JPEG", quality=90)
    assert mask.suffix == ".png" and Image.open(mask).format == "JPEG"
    return mask


@case(ValidationFailed)
def validate_jpeg_mask_under_a_png_name(w):
    mask = jpeg_mask(w.data())
    w.names(mask, "JPEG", "PNG")
    w.keep(w.data())
    validated(w.data())


@case(DataError)
def loader_jpeg_mask_under_a_png_name(w):
    mask = jpeg_mask(w.data(), "test")
    w.names(mask, "JPEG", "lossy")
    data = MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)
    data[data.samples.index(next(s for s in data.samples if s.mask == mask))]


@case(ValidationFailed)
def validate_released_id_map_on_zero_based_masks(w):
    w.names("id_map='released'", "0-based", "raw 0, 1", "id_map=identity")
    validated(w.data(), id_map="released")


@case(CommandError)
def validate_cli_released_id_map_on_zero_based_masks(w):
    w.names("0-based", "raw 0, 1")
    prepare_cli("validate", str(w.data()), "--dataset", "mtlesd", "--id-map", "released", "--no-index", expect=1)


def file_for_activity_folder(root: Path, split: str, activity: int) -> Path:
    folder = root / split / str(activity)
    shutil.rmtree(folder)
    folder.write_text("an archive that was not unpacked")
    return folder


@case(ValidationFailed)
def validate_file_where_an_activity_folder_belongs(w):
    path = file_for_activity_folder(w.data(), "train", 3)
    w.names(path, "a file where activity folder '3'")
    validated(w.data())


@case(DataError)
def loader_file_where_an_activity_folder_belongs(w):
    path = file_for_activity_folder(w.data(), "test", 2)
    w.names(path, "activity folder '2'")
    MTLDataset(w.data(), "test", dataset="mtlesd", image_size=SIZE)


@case(ValidationFailed)
def validate_binary_masks(w):
    for mask in w.data().glob("*/*/mask/*.png"):
        values = np.asarray(Image.open(mask))
        Image.fromarray(np.where(values > 0, 255, 0).astype(np.uint8), mode="L").save(mask)
    w.names("binary", "0/255", "id_map.json")
    validated(w.data())


@case(ValidationFailed)
def validate_dataset_file_name_not_utf8(w):
    folder = w.data() / "train" / "2" / "mask"
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:
        f.write(first(w.data(), "train", "mask", activity=2).read_bytes())
    w.names(str(folder) + "/caf\\xe9.png", "UTF-8")
    validated(w.data())


@case(ValidationFailed)
def validate_image_over_the_decompression_bomb_limit(w):
    import PIL.Image

    image = first(w.data(), "test", activity=3)
    w.names(image, "safety limit", "MAX_IMAGE_PIXELS")
    with mock.patch.object(PIL.Image, "MAX_IMAGE_PIXELS", 1000):  # every 56 x 56 file is now "a bomb"
        validated(w.data())


# --- weights: a non-checkpoint given to evaluate; a DINO training checkpoint
@case(CommandError)
def evaluate_released_text_file(w):
    path = w.tmp / "notes.pt"
    path.write_text("these are my notes, not a checkpoint\n")
    w.names(path, "not a torch or safetensors file")
    w.forbid("weights_only", "likely succeed", "pickle.load")
    w.keep(w.tmp)
    evaluate_cli("--released", str(path), "--data-root", str(w.shared.data), expect=1)


@case(CommandError)
def evaluate_released_random_bytes(w):
    path = w.tmp / "model.pt"
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    w.names(path, "not a torch or safetensors file", "sha256")
    w.forbid("weights_only", "likely succeed")
    evaluate_cli("--released", str(path), "--data-root", str(w.shared.data), expect=1)


@case(WeightsError)
def weights_dino_teacher_checkpoint_with_prefixed_keys(w):
    from safetensors.torch import load_file

    plain = load_file(str(w.shared.weights_a))
    path = w.tmp / "dino_checkpoint.pth"
    torch.save({**{f"teacher.backbone.{k}": v for k, v in plain.items()},
                **{f"student.backbone.{k}": v.clone() for k, v in plain.items()},
                "teacher.dino_head.last_layer.weight": torch.zeros(4, 64)}, path)
    w.names(path, "'teacher.backbone.'", f"{len(plain)} of the model's", "k[17:]")
    w.forbid("accept those named keys")
    w.absent(w.tmp / "runs" / "run" / "config.json")
    fit(w.config(model={**TINY, "pretrained": str(path)}))


# --- notebook list parameters
experiment_case("experiment_weights_not_a_mapping", "weights", weights="dinov2_vitb14")


@case(ConfigError)
def experiment_grid_seeds_not_a_list(w):
    exp = Experiment("nb", out_dir=w.tmp / "exp", image_size=SIZE, n_train=12, n_test=6)
    w.names("seeds[0]='zero'", "[0, 1, 2]", "-p seeds")
    exp.grid(["vit_tiny_patch14"], ["tesla"], seeds="zero")


@case(ConfigError)
def experiment_grid_seeds_with_a_fraction(w):
    exp = Experiment("nb", out_dir=w.tmp / "exp", image_size=SIZE, n_train=12, n_test=6)
    w.names("seeds[1]", "1.5")
    exp.grid(["vit_tiny_patch14"], ["tesla"], seeds="[0, 1.5]")


def test_the_table_has_at_least_sixty_distinct_cases():
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, shared: Shared, tmp_path: Path):
    w = World(shared, tmp_path)
    with pytest.raises(case.error) as info:
        case.body(w)
    message = str(info.value)
    assert w.culprits, "a case must say what its error names"
    for culprit in w.culprits:
        assert culprit in message, f"{culprit!r} not named in: {message}"
    for text in w.forbidden:
        assert text not in message, f"{text!r} said in: {message}"
    for folder, before in w.kept.items():
        assert snapshot(folder) == before, f"{folder} changed"
    for path in w.absent_paths:
        assert not path.exists(), f"{path} was created"


# ------------------------------------------------------------------------------------------------ behaviour

def test_cli_as_a_command_exits_2_naming_the_field():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "endoarss_lib.train", "augment=flase", "--print-config"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "augment" in done.stderr and "Traceback" not in done.stderr


def test_command_line_words_mean_what_they_say():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main(["augment=off", "amp=off", "--print-config"]) == 0
    import yaml

    printed = yaml.safe_load(out.getvalue())
    assert printed["augment"] is False and printed["amp"] == "off"


def test_16_bit_grey_image_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1, 128, 255], [256, 257, 1000, 32896], [40000, 65279, 65534, 65535]], np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # stored as 16-bit grey
    # by hand: round(v / 257): 65535 -> 255, 32896 -> 128, 1000 -> 3.89 -> 4, 128 -> 0.498 -> 0, 40000 -> 155.6 -> 156
    expected = np.array([[0, 0, 0, 1], [1, 1, 4, 128], [156, 254, 255, 255]], np.uint8)
    rgb = read_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


def test_16_bit_image_in_a_dataset_keeps_its_grey_levels(shared, tmp_path):
    root = Path(shutil.copytree(shared.data, tmp_path / "data"))
    image = first(root, "test")
    grey = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
    Image.fromarray(grey).save(image)
    ds = MTLDataset(root, "test", dataset="mtlesd", image_size=SIZE)
    loaded, _ = ds.load_raw(ds.samples.index(next(s for s in ds.samples if s.image == image)))
    np.testing.assert_array_equal(loaded[..., 0], np.rint(grey / 257.0).astype(np.uint8))
    assert (loaded == 255).mean() < 0.01  # not 72 % white


def test_selection_score_follows_each_metric_direction():
    assert selection_score({"seg_hd95": 10.0}, "seg_hd95") > selection_score({"seg_hd95": 20.0}, "seg_hd95")
    assert selection_score({"seg_hd95": 12.5}, "seg_hd95") == -12.5
    assert selection_score({"seg_miou": 0.4}, "seg_miou") == 0.4
    assert selection_score({"cls_accuracy": 0.5, "seg_miou": 0.3}, "score") == pytest.approx(0.4)
    assert selection_score({"seg_hd95": float("nan")}, "seg_hd95") == -float("inf")  # undefined: worst


@pytest.mark.parametrize("lr,seed", [(3e-3, 0), (1e-2, 1)])
def test_hd95_selection_picks_the_epoch_with_the_lowest_validation_hd95(shared, tmp_path, lr, seed):
    cfg = tiny_config(shared.data, tmp_path, epochs=3, batch_size=4, val_fraction=0.5, lr=lr, seed=seed,
                      select_metric="seg_hd95", eval_distances_on_val=True)
    row = fit(cfg)
    log = pd.read_csv(run_dir(cfg) / "log.csv")
    finite = log[np.isfinite(log["val_seg_hd95"])]
    if len(finite):  # the lowest HD95 wins; an undefined one (NaN: nothing predicted) is never preferred
        assert row["best_epoch"] == int(finite.loc[finite["val_seg_hd95"].idxmin(), "epoch"])
        assert row["val_seg_hd95"] == pytest.approx(finite["val_seg_hd95"].min())
    else:  # every epoch undefined: the first is kept, and the run still finishes
        assert row["best_epoch"] == 1
    assert (run_dir(cfg) / "best.pt").is_file()


def test_one_based_masks_validate_and_load_with_an_id_map_json_beside_them(shared, tmp_path):
    root = Path(shutil.copytree(shared.data, tmp_path / "data"))
    for mask in root.glob("*/*/mask/*.png"):
        Image.fromarray(np.asarray(Image.open(mask)).astype(np.uint8) + 1, mode="L").save(mask)
    (root / "id_map.json").write_text(json.dumps({"raw_to_train": {str(k + 1): k for k in range(7)}}))
    report = prepare.validate(root, "mtlesd", write_index=False)
    assert report.ok, report.format()
    ds = MTLDataset(root, "test", dataset="mtlesd", image_size=SIZE)
    original = MTLDataset(shared.data, "test", dataset="mtlesd", image_size=SIZE)
    np.testing.assert_array_equal(ds.load_raw(0)[1], original.load_raw(0)[1])


def test_validating_the_data_of_a_finished_run_does_not_make_it_look_changed(shared, tmp_path):
    root = Path(shutil.copytree(shared.data, tmp_path / "data"))
    cfg = tiny_config(root, tmp_path / "runs")
    fit(cfg)
    before = (run_dir(cfg) / "result.json").read_text()
    assert prepare.validate(root, "mtlesd").ok  # writes index.json beside the data
    assert (root / "index.json").is_file()
    assert json.dumps(fit(cfg), sort_keys=True) == json.dumps(json.loads(before), sort_keys=True)


def test_a_refused_rerun_leaves_config_json_and_checkpoints_byte_identical(shared, tmp_path):
    folder = Path(shutil.copytree(shared.interrupted, tmp_path / "runs" / "run"))
    before = snapshot(folder)
    for changed in (dict(lr=1e-4), dict(seed=3), dict(augment=False)):
        with pytest.raises(CheckpointMismatch):
            fit(tiny_config(shared.data, tmp_path / "runs", epochs=2, **changed))
        assert snapshot(folder) == before


def _raise_texts(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) or (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "warn"):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield node.lineno, sub.value


def test_no_error_message_advises_deleting_anything():
    found = []
    for path in sorted((ROOT / "endoarss_lib").rglob("*.py")):
        for line, text in _raise_texts(ast.parse(path.read_text())):
            if any(word in text.lower() for word in ("delete", "rm -r", "rmtree", "remove the folder",
                                                       "remove the run")):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not found, found


# ------------------------------------------------------------------------------------------------ issue 21 behaviour

# Texts that YAML 1.1 or a number parser would turn into something else (202401, 7, 750, 1000.0, 16, 1000, ...).
TEXTS = ["2024_01", "007", "12:30", "1e3", "0x10", "1_000", "08:00:00", "+1", ".5", "3.0", "0o17", "-0"]


@pytest.mark.parametrize("text", TEXTS)
def test_text_fields_keep_the_typed_text_on_the_command_line_and_in_yaml(text, tmp_path):
    cli_cfg = apply_overrides(preset("smoke"), [f"run_name={text}", f"data_root={text}", "synthetic=false",
                                                f"model.pretrained={text}"])
    path = write_yaml(tmp_path / "run.yaml", f"preset: smoke\nrun_name: {text}\ndata_root: {text}\n"
                                             f"synthetic: false\nmodel:\n  pretrained: {text}\n")
    for cfg in (cli_cfg, load_config(path)):
        assert (cfg.run_name, cfg.data_root, cfg.model.pretrained) == (text, text, text)
        assert run_dir(cfg).name == text and cfg.data_root_path() == Path(text)


def test_text_words_stay_text_and_null_words_mean_null():
    cfg = apply_overrides(preset("smoke"), ["run_name=true", "data_root=off", "cache_dir=no"])
    assert (cfg.run_name, cfg.data_root, cfg.cache_dir) == ("true", "off", "no")
    cfg = apply_overrides(preset("smoke", run_name="x"), ["run_name=null"])
    assert cfg.run_name is None
    assert apply_overrides(preset("smoke"), ["model.pretrained=false"]).model.pretrained is False


@pytest.mark.parametrize("alias", ["DB-MTL", "db-mtl", "dbmtl", "db_mtl", "DB_MTL", "Db-Mtl", "DB MTL"])
def test_weighting_aliases_are_one_method_with_one_hash_and_one_folder(alias):
    canonical = preset("smoke", weighting="db_mtl")
    for cfg in (preset("smoke", weighting=alias), apply_overrides(preset("smoke"), [f"weighting={alias}"])):
        assert cfg.weighting == "db_mtl"
        assert cfg.results_hash() == canonical.results_hash() and run_dir(cfg) == run_dir(canonical)


def test_a_run_folder_written_under_an_alias_still_loads(shared, tmp_path):
    from endoarss_lib.config import _results_hash

    folder = Path(shutil.copytree(shared.finished, tmp_path / "runs" / "run"))
    recorded = json.loads((folder / "config.json").read_text())
    recorded.pop("config_hash")
    recorded["weighting"] = "EW"  # as a version before canonical names wrote `weighting=EW`
    old_hash = _results_hash(recorded)
    assert old_hash != read_run_config(shared.finished).results_hash()
    (folder / "config.json").write_text(json.dumps({**recorded, "config_hash": old_hash}))
    best = torch.load(folder / "best.pt", weights_only=True)
    torch.save({**best, "config_hash": old_hash}, folder / "best.pt")
    cfg = read_run_config(folder)
    assert cfg.weighting == "ew" and cfg.results_hash() == old_hash
    assert not load_run_model(folder).training  # its best.pt still loads
    other = dict(recorded, lr=0.5)  # values that do not hash to the recorded hash: no adoption
    (folder / "config.json").write_text(json.dumps({**other, "config_hash": old_hash}))
    assert read_run_config(folder).results_hash() != old_hash


@pytest.mark.parametrize("field,typed,canonical", [
    ("amp", "OFF", "off"), ("scheduler", "Cosine", "cosine"), ("normalize", "ImageNet", "imagenet"),
    ("select_on", "VAL", "val"), ("cls_loss", "CE", "ce"), ("dataset", "MTLESD", "mtlesd"),
    ("weighting", "Aligned-MTL", "aligned_mtl"), ("weighting", "GM-Coord", "gm_coord"),
    ("id_map", "Identity", "identity"), ("select_metric", "seg_mIoU", "seg_miou"), ("device", "CPU", "cpu"),
    ("model.arch", "DSelect-K", "dselect_k"), ("model.backbone", "ViT-Tiny-Patch14", "vit_tiny_patch14"),
    ("model.tasks", "[SEG]", "[seg]")])
def test_choice_values_are_matched_ignoring_case_and_stored_canonically(field, typed, canonical):
    cfg, same = (apply_overrides(preset("smoke"), [f"{field}={v}", "model.pretrained=false"])
                 for v in (typed, canonical))
    value = (lambda c: c.model.to_dict()[field[len("model."):]] if field.startswith("model.") else getattr(c, field))
    assert value(cfg) == value(same) and cfg.results_hash() == same.results_hash()
    assert value(cfg) == (("seg",) if field == "model.tasks" else canonical)


def test_dotted_keys_set_one_entry_of_a_mapping(tmp_path):
    assert apply_overrides(preset("smoke"), ["loss_weights.cls=2"]).loss_weights == {"cls": 2.0, "seg": 1.0}
    assert load_config(None, ["loss_weights.seg=0.25"]).loss_weights == {"cls": 1.0, "seg": 0.25}
    cfg = apply_overrides(preset("smoke"), ["weighting=db_mtl", "weighting_hparams.beta=0.5"])
    assert cfg.weighting_hparams == {"beta": 0.5}
    released = load_config(None, ["dataset=mtlendovis", "weighting_hparams.mu=0.5"], preset_name="released")
    assert released.weighting_hparams == {"warmup_convention": "libmtl", "mu": 0.5}  # the preset's entry is kept
    path = write_yaml(tmp_path / "run.yaml", "preset: smoke\nloss_weights.seg: 0.5\nmodel.arch: hps\n")
    cfg = load_config(path, ["loss_weights.cls=3"])
    assert cfg.loss_weights == {"cls": 3.0, "seg": 0.5} and cfg.model.arch == "hps"
    assert preset("smoke", loss_weights={"cls": 2}).loss_weights == {"cls": 2.0}  # a whole mapping replaces


def test_tilde_in_paths_is_the_home_folder(shared, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    path = write_yaml(tmp_path / "run.yaml", "preset: smoke\nout_dir: ~/runs\ndata_root: ~/data\nsynthetic: false\n"
                                             "model: {pretrained: ~/w.safetensors}\n")
    for cfg in (load_config(path),
                load_config(None, ["out_dir=~/runs", "data_root=~/data", "synthetic=false",
                                   "model.pretrained=~/w.safetensors"])):
        assert run_dir(cfg).parent == home / "runs" and cfg.data_root_path() == home / "data"
        assert cfg.model.pretrained == str(home / "w.safetensors")
    row = fit(tiny_config(shared.data, "~/runs"))
    assert row["run_dir"] == str(home / "runs" / "run") and (home / "runs" / "run" / "result.json").is_file()
    assert not (tmp_path / "~").exists()


def test_a_moved_run_folder_reports_where_it_is_now(shared, tmp_path):
    first_home = Path(shutil.copytree(shared.finished, tmp_path / "first" / "run"))
    (tmp_path / "elsewhere").mkdir()
    moved = Path(shutil.move(first_home, tmp_path / "elsewhere" / "run"))
    assert not first_home.exists()
    before = snapshot(moved)
    row = fit(tiny_config(shared.data, tmp_path / "elsewhere"))
    assert row["run_dir"] == str(moved)
    assert json.loads((moved / "result.json").read_text())["run_dir"] == str(shared.finished)  # the file is kept
    assert snapshot(moved) == before  # a finished run is only read
    model = load_run_model(row["run_dir"])
    assert not model.training


def test_masks_with_255_ignore_regions_validate_load_and_train(shared, tmp_path):
    root = Path(shutil.copytree(shared.data, tmp_path / "data"))
    painted = {}
    for mask in sorted(root.glob("*/*/mask/*.png"))[::2]:
        values = np.asarray(Image.open(mask)).copy()
        values[:5] = 255  # a "void" band of 5 rows
        Image.fromarray(values, mode="L").save(mask)
        painted[mask] = 5 * SIZE
    report = prepare.validate(root, "mtlesd", write_index=False)
    assert report.ok, report.format()
    assert report.raw_values[255] == sum(painted.values())
    assert any("ignore_index" in w and f"{sum(painted.values())} pixels" in w for w in report.warnings)
    data, original = (MTLDataset(r, "test", dataset="mtlesd", image_size=SIZE) for r in (root, shared.data))
    for index, sample in enumerate(data.samples):
        mask, clean = data.load_raw(index)[1], original.load_raw(index)[1]
        band = np.zeros_like(mask, bool)
        band[:5] = sample.mask in painted
        assert (mask[band] == 255).all() and np.array_equal(mask[~band], clean[~band])
    with pytest.raises(DataError, match=r"\[255\]"):  # another ignore_index: 255 is an unknown value again
        MTLDataset(root, "test", dataset="mtlesd", image_size=SIZE, ignore_index=254).load_raw(0)
    (root / "id_map.json").write_text(json.dumps({"raw_to_train": {**{str(k): k for k in range(7)}, "255": 255}}))
    assert prepare.validate(root, "mtlesd", write_index=False).ok  # the map the message advises is accepted
    row = fit(tiny_config(root, tmp_path / "runs"))
    assert np.isfinite(row["test_seg_miou"]) and np.isfinite(row["test_cls_accuracy"])


def test_a_diverged_run_is_stopped_again_on_rerun_and_keeps_its_folder(shared, tmp_path):
    cfg = tiny_config(shared.data, tmp_path, lr=1e6, epochs=2)
    with pytest.raises(RunError, match="epoch 2"):
        fit(cfg)
    before = snapshot(run_dir(cfg))
    assert "last.pt" in before and "result.json" not in before
    with pytest.raises(RunError, match="epoch 2"):
        fit(cfg)
    assert snapshot(run_dir(cfg)) == before


def test_a_killed_synthetic_generation_leaves_no_partial_folder(tmp_path):
    root = tmp_path / "set"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = (f"from endoarss_lib.data import make_synthetic; make_synthetic({str(root)!r}, 'mtlesd', seed=0, "
              f"n_train=600, n_test=60, image_size=112)")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(tmp_path.glob(".set.partial-*/train/*/image/*.png")):
            assert proc.poll() is None, "the generation ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = list(tmp_path.glob(".set.partial-*"))
    assert left and not root.exists()  # what kill -9 leaves
    make_synthetic(root, "mtlesd", seed=0, n_train=6, n_test=3, image_size=SIZE)
    assert not list(tmp_path.glob(".set.partial-*")) and (root / "dataset_card.json").is_file()


def test_stale_partials_of_live_writers_are_kept(tmp_path):
    from endoarss_lib.data.synthetic import remove_stale_partials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid, name in ((os.getpid(), "live"), (dead.pid, "dead")):
        folder = tmp_path / f".set.partial-{name}"
        folder.mkdir()
        (folder / ".generating.json").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    fresh, old = tmp_path / ".set.partial-fresh", tmp_path / ".set.partial-old"
    fresh.mkdir()
    old.mkdir()
    os.utime(old, (time.time() - 3600,) * 2)
    (tmp_path / ".other.partial-x").mkdir()  # another set's
    assert remove_stale_partials(tmp_path / "set") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-x", ".set.partial-fresh", ".set.partial-live"]


_RACE = """
import sys, time
from pathlib import Path
from endoarss_lib import train  # every import done before the start signal
from endoarss_lib.training import engine
Path(sys.argv[2]).write_text("ready")
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.002)
sys.exit(train.main(sys.argv[3:]))
"""


def _race(tmp_path: Path, data: Path, lrs: list[float], run_name: str) -> list[tuple[int, str, str]]:
    """Start one training per learning rate into ``<tmp>/runs/<run_name>``, all released at the same instant."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    go = tmp_path / f"go-{run_name}"
    procs, ready = [], []
    for i, lr in enumerate(lrs):
        ready.append(tmp_path / f"ready-{run_name}-{i}")
        argv = [f"data_root={data}", "synthetic=false", f"out_dir={tmp_path / 'runs'}", f"run_name={run_name}",
                "image_size=56", "epochs=1", "batch_size=6", "progress=false", "model.backbone=vit_tiny_patch14",
                "model.pretrained=false", f"lr={lr}"]
        procs.append(subprocess.Popen([sys.executable, "-c", _RACE, str(go), str(ready[-1]), *argv], env=env,
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not all(r.exists() for r in ready):
            time.sleep(0.05)
        assert all(r.exists() for r in ready), "the trainings did not get ready"
        go.write_text("go")  # all of them wait on this file, imports done: they start within milliseconds
        outputs = [p.communicate(timeout=600) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_trainings_started_together_into_one_run_folder(shared, tmp_path):
    lrs = [0.003, 0.01, 0.02, 0.03]
    results = _race(tmp_path, shared.data, lrs, "race")
    codes = [code for code, _, _ in results]
    assert sorted(codes) == [0, 1, 1, 1], [(c, e[-500:]) for c, _, e in results]
    winner = codes.index(0)
    folder = tmp_path / "runs" / "race"
    row, result = json.loads(results[winner][1]), json.loads((folder / "result.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config["lr"] == lrs[winner] and row == result and result["config_hash"] == config["config_hash"]
    for code, out, err in (r for i, r in enumerate(results) if i != winner):
        assert "already works in" in err and str(folder) in err and "refused before anything was written" in err
        assert "Traceback" not in err and not out.strip()
    assert not (folder / ".run.lock").exists()
    before = snapshot(folder)  # nothing lost: a loser started again is refused, the winner's run stays as it is
    loser = codes.index(1)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train.main([f"data_root={shared.data}", "synthetic=false", f"out_dir={tmp_path / 'runs'}",
                           "run_name=race", "image_size=56", "epochs=1", "batch_size=6", "progress=false",
                           "model.backbone=vit_tiny_patch14", "model.pretrained=false", f"lr={lrs[loser]}"])
    assert code == 1 and "holds the run of another config" in err.getvalue()
    assert snapshot(folder) == before


def test_the_same_training_started_twice_together_trains_once(shared, tmp_path):
    results = _race(tmp_path, shared.data, [0.003, 0.003], "twice")
    assert [code for code, _, _ in results] == [0, 0], [e[-500:] for _, _, e in results]
    rows = [json.loads(out) for _, out, _ in results]
    assert rows[0] == rows[1]
    assert sum("waiting for it to finish" in err for _, _, err in results) == 1  # the other one waited


# --- console scripts: names, versions, exit codes, no tracebacks
def _console_scripts() -> dict[str, str]:
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_every_console_script_has_a_version_and_names_itself(script, monkeypatch, capsys):
    import importlib

    from endoarss_lib.version import __version__

    module = _console_scripts()[script]
    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [f"/opt/venv/bin/{script}"])
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"{script} (endoarss) {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: {script} ")
    monkeypatch.setattr(sys, "argv", [str(ROOT / (module.replace(".", "/") + ".py"))])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


def test_an_installed_console_script_names_itself():
    script = Path(sys.executable).parent / "endoarss-train"
    if not script.is_file():
        pytest.skip("endoarss-train is not installed beside this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(script), "--version"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("endoarss-train (endoarss) ")


def test_an_unexpected_error_is_one_line_unless_debug(shared, tmp_path, monkeypatch, capsys):
    def broken(cfg):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("endoarss_lib.training.engine.fit", broken)
    argv = ["image_size=56", f"data_root={shared.data}", "synthetic=false", f"out_dir={tmp_path}",
            "model.backbone=vit_tiny_patch14", "model.pretrained=false"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "unexpected ZeroDivisionError: division by zero" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        train.main([*argv, "--debug"])


def _documented_status(keyword: str) -> int:
    """The exit status docs/troubleshooting.md states for errors about ``keyword`` (its exit status table)."""
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| `")]
    found = [int(r[1].strip(" `")) for r in rows if len(r) > 2 and r[1].strip(" `").isdigit() and keyword in r[2]]
    assert len(found) == 1, (keyword, found)
    return found[0]


def test_exit_statuses_are_the_documented_ones(shared, tmp_path):
    assert _documented_status("weights") == 1 and _documented_status("config") == 2
    missing = tmp_path / "nowhere.pth"
    small = ["image_size=56", "epochs=1", "progress=false", "model.backbone=vit_tiny_patch14",
             f"out_dir={tmp_path / 'runs'}", f"data_root={shared.data}", "synthetic=false"]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert train.main([*small, f"model.pretrained={missing}"]) == _documented_status("weights")
        assert evaluate_cli_module.main(["--released", str(missing), "--data-root", str(shared.data)]) == \
            _documented_status("weights")
        assert train.main([*small, "model.pretrained=false", "epochs=abc"]) == _documented_status("config")
        assert prepare.main(["validate", str(tmp_path / "nowhere"), "--dataset", "mtlesd"]) == \
            _documented_status("data")


# --- notebook list parameters, as papermill passes them
@pytest.mark.parametrize("value,item_type,expected", [
    ("[0, 1, 2]", int, [0, 1, 2]), (0, int, [0]), ("0,1,2", int, [0, 1, 2]), ("0 1 2", int, [0, 1, 2]),
    ([0, "1"], int, [0, 1]), ((3,), int, [3]), ("", int, []), ("[]", int, []), ("(4, 5)", int, [4, 5]),
    ("2.0", int, [2]), ("tesla", str, ["tesla"]), ("[mmoe, tesla]", str, ["mmoe", "tesla"]), ("007", str, ["007"]),
    ("[1, 3]", float, [1.0, 3.0]), ("[vit_tiny_patch14, {backbone: resnet_tiny}]", None,
                                    ["vit_tiny_patch14", {"backbone": "resnet_tiny"}])])
def test_notebook_list_parameters_accept_what_papermill_passes(value, item_type, expected):
    out = as_list("p", value, item_type)
    assert out == expected and all(type(a) is type(b) for a, b in zip(out, expected))


def test_papermill_parameters_reach_the_grid_as_lists(tmp_path):
    from papermill.cli import _resolve_type  # how `papermill -p NAME VALUE` types VALUE

    assert as_list("seeds", _resolve_type("[0, 1, 2]"), int) == [0, 1, 2]  # the README's -p seeds "[0, 1, 2]"
    assert as_list("seeds", _resolve_type("0"), int) == [0]
    assert as_mapping("weights", _resolve_type('{"vit_tiny_patch14": "/w.pth"}')) == {"vit_tiny_patch14": "/w.pth"}
    exp = Experiment("nb", out_dir=tmp_path / "exp", image_size=SIZE, n_train=12, n_test=6)
    grid = exp.grid(_resolve_type("vit_tiny_patch14"), _resolve_type("[tesla, hps]"), seeds=_resolve_type("[0, 1]"),
                    single_task=False)
    assert sorted((c.model.arch, c.seed) for c in grid.values()) == [("hps", 0), ("hps", 1), ("tesla", 0),
                                                                    ("tesla", 1)]


# ------------------------------------------------------------------------------------------------ sweep processes

_POOL_SCRIPT = """
import os, sys, time
from endoarss_lib.experiments.sweep import _pool
pool = _pool(1, [])
print(pool.submit(os.getpid).result(), flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_sweep_pool_workers_die_when_the_sweep_is_killed():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", _POOL_SCRIPT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 240)
        assert ready, "the sweep-like parent did not start its pool"
        worker = int(parent.stdout.readline())
        assert worker != parent.pid and not _gone(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 15
        while time.time() < deadline and not _gone(worker):
            time.sleep(0.1)
        assert _gone(worker), f"pool worker {worker} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_dead_sweeps_lock_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "what": "sweep", "started": "then"}))
    with pytest.warns(UserWarning, match=rf"pid {dead.pid}.*no longer running"):
        with folder_lock(tmp_path, LOCK_NAME, "sweep") as held:
            assert json.loads(held.read_text())["pid"] == os.getpid()
            with pytest.raises(LockHeld, match=str(os.getpid())):  # a second sweep meanwhile: refused
                with folder_lock(tmp_path, LOCK_NAME, "sweep"):
                    pass
    assert not lock.exists()  # released


# ------------------------------------------------------------------------------------------------ stale temporaries

def _temporaries(folder: Path) -> tuple[Path, Path]:
    """An old temporary (a killed write's, an hour old) and a fresh one (a live writer's) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    old, fresh = folder / ".last.abc123.pt.tmp", folder / ".log.def456.csv.tmp"
    old.write_bytes(b"half")
    fresh.write_bytes(b"writing")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    return old, fresh


def test_remove_stale_temporaries_keeps_a_live_writers_file(tmp_path):
    old, fresh = _temporaries(tmp_path)
    (tmp_path / "kept.tmp").write_text("not ours: no leading dot")
    os.utime(tmp_path / "kept.tmp", (0, 0))
    assert remove_stale_temporaries(tmp_path) == 1
    assert not old.exists() and fresh.exists() and (tmp_path / "kept.tmp").exists()


def test_fit_removes_stale_temporaries_from_its_run_folder(shared, tmp_path):
    old, fresh = _temporaries(tmp_path / "runs" / "run")
    fit(tiny_config(shared.data, tmp_path / "runs"))
    assert not old.exists() and fresh.exists()


def test_sweep_removes_stale_temporaries_from_its_folders(tmp_path):
    grid = sweep_grid(tmp_path)
    in_run = _temporaries(sweep_folder(load_grid(grid), tmp_path) / "0123456789")
    in_tables = _temporaries(tmp_path / "results" / "tables")
    run_sweep(grid, tmp_path, aggregate_only=True, progress=False)
    for old, fresh in (in_run, in_tables):
        assert not old.exists() and fresh.exists()
    assert not (sweep_folder(load_grid(grid), tmp_path) / LOCK_NAME).exists()


def test_corrupted_set_cells_lose_stale_temporaries(shared, tmp_path):
    kw = dict(names=["gaussian_noise"], severities=[1], workers=1, progress=False)
    cells = build_corrupted_set(shared.data, tmp_path / "cells", **kw)
    cell = cells[("gaussian_noise", 1)]
    old, fresh = _temporaries(cell / "test" / "1" / "image")
    before = {p: p.stat().st_mtime_ns for p in cell.rglob("*.png")}
    build_corrupted_set(shared.data, tmp_path / "cells", **kw)
    assert not old.exists() and fresh.exists()
    assert {p: p.stat().st_mtime_ns for p in cell.rglob("*.png")} == before  # the finished cell was reused


@pytest.mark.parametrize("argv", [["--preset", "smoke"], ["--preset", "paper", "data_root=/x"],
                                  ["--preset", "smoke", "model.tasks=[cls, seg, presence]", "run_name=007"]])
def test_a_printed_config_read_back_is_the_same_config(tmp_path, argv):
    # what --print-config writes is a config file: read back through --config it must resolve to the same config
    # (its class counts arrive as text from the file, like every value of a config file)
    from endoarss_lib.config import load_config

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main([*argv, "--print-config"]) == 0
    path = tmp_path / "printed.yaml"
    path.write_text(out.getvalue())
    original = load_config(None, [a for a in argv if "=" in a], preset_name=argv[1])
    again = load_config(str(path), [])
    assert again.to_dict() == original.to_dict()
    assert again.results_hash() == original.results_hash()
