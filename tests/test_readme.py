"""Every command the README shows is run here, as written where that is possible on a CPU without real data, and
otherwise in the closest form that still exercises what the command promises (each case says which and why).

A command added to the README without a case here fails ``test_every_readme_command_has_a_case``.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


# README command -> the case below that runs it
CASES = {
    "make demo": "make_targets",
    "make test": "make_targets",
    "make lab": "make_targets",
    ".venv/bin/papermill notebooks/00_quickstart.ipynb out.ipynb -p dataset mtlendovis -p image_size 224 -p epochs 50 "
    "-p device cuda": "papermill_example",
    ".venv/bin/python -m endoarss_lib.train --preset smoke": "train_smoke",
    ".venv/bin/python -m endoarss_lib.train --help": "train_help",
    ".venv/bin/python -m endoarss_lib.train --preset paper dataset=mtlendovis data_root=/data/MTLEndovis "
    "--print-config": "train_print_config",
    ".venv/bin/python -m endoarss_lib.train --preset paper dataset=mtlesd data_root=/data/MTLESD "
    "model.pretrained=/weights/dinov2_vitb14_pretrain.pth": "train_paper",
    ".venv/bin/torchrun --nproc_per_node 4 -m endoarss_lib.train --config my_run.yaml": "train_config_file",
    ".venv/bin/python -m endoarss_lib.data.prepare sources": "prepare_sources",
    ".venv/bin/python -m endoarss_lib.data.prepare validate /data/MTLESD --dataset mtlesd": "prepare_validate",
    ".venv/bin/python -m endoarss_lib.data.prepare endovis18 --frames EV18 --type-masks ISINET_TYPES --vqla EV18_VQLA "
    "--out /data/MTLEndovis": "prepare_converters",
    ".venv/bin/python -m endoarss_lib.data.prepare endovis17 --frames EV17 --type-masks EV17_TYPES --vqla EV17_VQLA "
    "--out /data/MTLEndovis-Gen [--unmapped background]": "prepare_converters",
    ".venv/bin/python -m endoarss_lib.evaluate --released mtl_MOLA_DB_MTL_best_cls_w=1_seg_w=1_dinonet.pt "
    "--data-root /data/MTLESD --dataset mtlesd --out released.json": "evaluate_released",
}


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ENDOARSS_DATA": str(tmp_path / "data")}


def _run(command: str, tmp_path: Path, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """A README command with ``.venv/bin/`` meaning this environment's scripts."""
    argv = shlex.split(command)
    if argv[0].startswith(".venv/bin/"):
        argv[0] = str(BIN / argv[0].removeprefix(".venv/bin/"))
    return subprocess.run(argv, cwd=cwd or tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def _command(case: str) -> list[str]:
    return [c for c, k in CASES.items() if k == case]


def test_every_readme_command_has_a_case():
    commands = readme_commands()
    missing = [c for c in commands if c not in CASES]
    assert not missing, f"README commands without a case in {Path(__file__).name}: {missing}"
    stale = [c for c in CASES if c not in commands]
    assert not stale, f"cases for commands the README no longer shows: {stale}"


def test_make_targets(tmp_path):
    # the targets exist and expand (make -n prints the recipe without running it: make test is what CI runs, make demo
    # the quickstart, which nbval and the browser test run; make lab starts a server)
    for command in _command("make_targets") + ["make executed", "make book", "make bench", "make tensorboard"]:
        out = _ok(_run(f"make -n {command.split()[1]}", tmp_path, cwd=ROOT))
        assert out.strip(), command
    assert "00_quickstart" in _ok(_run("make -n demo", tmp_path, cwd=ROOT))
    assert "jupyter lab" in _ok(_run("make -n lab", tmp_path, cwd=ROOT))


def test_papermill_example(tmp_path):
    # As written, but --prepare-only (the example asks for a GPU and 50 epochs at 224 px): the injected parameters
    # must take effect, and the notebook's first cells (parameter check, data) must follow them: the synthetic folder
    # is derived from dataset and image_size (it once stayed the fixed mtlesd folder and failed).
    (command,) = _command("papermill_example")
    out = tmp_path / "out.ipynb"
    _ok(_run(command.replace("notebooks/", f"{ROOT}/notebooks/").replace(" out.ipynb", f" {out}") + " --prepare-only",
             tmp_path))
    import nbformat

    nb = nbformat.read(out, as_version=4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert 'dataset = "mtlendovis"' in injected.source and "image_size = 224" in injected.source
    first = [c.source for c in nb.cells if c.cell_type == "code"][:3]  # parameters, injected, Experiment(...)
    script = "\n".join(first) + ("\nb = exp.base\nprint(b.dataset, b.image_size, b.epochs, b.device)\n"
                                 "print(exp.datasets(splits=('test',))['test'].root)\n")
    (tmp_path / "cells.py").write_text(script)
    printed = _ok(_run(f"{sys.executable} cells.py", tmp_path)).split("\n")
    assert printed[-3].split() == ["mtlendovis", "224", "50", "cuda"]
    assert "synthetic_mtlendovis" in printed[-2] and "224px" in printed[-2]


def test_train_smoke(tmp_path):
    # as written: the smoke preset trains the frozen synthetic-pretrained ViT + LoRA + TESLA on synthetic data
    (command,) = _command("train_smoke")
    out = _ok(_run(command, tmp_path))
    import json

    result = json.loads(out[out.index("{"):])
    assert result["pretrained_name"] == "synthdino_vit_mini14" and result["data"] == "synthetic"
    assert result["test_cls_accuracy"] > result["test_cls_majority_accuracy"]
    assert (tmp_path / result["run_dir"] / "result.json").is_file()


def test_train_help(tmp_path):
    (command,) = _command("train_help")
    out = _ok(_run(command, tmp_path))
    for field in ("epochs", "weighting", "select_on", "backbone", "lora_rank"):
        assert field in out, field


def test_train_print_config(tmp_path):
    (command,) = _command("train_print_config")
    out = _ok(_run(command, tmp_path))
    assert "preset: paper" in out and "dataset: mtlendovis" in out and "data_root: /data/MTLEndovis" in out
    assert "synthetic: false" in out and "lr: 0.001" in out  # the paper's MTLEndovis learning rate


def test_train_paper(tmp_path):
    # The paper's setting needs the real data, DINOv2 weights and a GPU: the same command with --print-config
    # resolves it (preset, model, weights path); without the files a run stops naming them.
    (command,) = _command("train_paper")
    out = _ok(_run(command + " --print-config", tmp_path))
    assert "backbone: dinov2_vitb14" in out and "pretrained: /weights/dinov2_vitb14_pretrain.pth" in out
    assert "weighting: db_mtl" in out and "lr: 0.0001" in out
    failed = _run(command + " epochs=1", tmp_path)
    assert failed.returncode != 0 and "/data/MTLESD" in failed.stderr + failed.stdout


def test_train_config_file(tmp_path):
    # torchrun with 4 processes needs 4 devices; the config file path is the same without torchrun: a YAML file is
    # read, typed and resolved (the data-parallel engine itself is tests/test_distributed.py)
    (tmp_path / "my_run.yaml").write_text("preset: smoke\nepochs: 3\nweighting: db_mtl\nmodel:\n  arch: hps\n")
    out = _ok(_run(".venv/bin/python -m endoarss_lib.train --config my_run.yaml --print-config", tmp_path))
    assert "epochs: 3" in out and "weighting: db_mtl" in out and "arch: hps" in out
    assert (BIN / "torchrun").is_file()


def test_prepare_sources(tmp_path):
    (command,) = _command("prepare_sources")
    out = _ok(_run(command, tmp_path))
    assert "MTLESD" in out and "EndoVis" in out


def test_prepare_validate(tmp_path):
    # as written, on a dataset folder in the real layout (synthetic here): every file decoded, OK
    from endoarss_lib.data import make_synthetic

    make_synthetic(tmp_path / "MTLESD", "mtlesd", n_train=6, n_test=3, image_size=56)
    (command,) = _command("prepare_validate")
    out = _ok(_run(command.replace("/data/MTLESD", str(tmp_path / "MTLESD")), tmp_path))
    assert "OK" in out or "ok" in out.lower()


def test_prepare_converters(tmp_path):
    # the converters need EndoVis frames (tests/test_prepare.py converts fabricated EndoVis layouts); here: the
    # commands exist with the options the README gives, and a missing source folder is named
    for command in _command("prepare_converters"):
        sub = command.split()[3]
        out = _ok(_run(f".venv/bin/python -m endoarss_lib.data.prepare {sub} --help", tmp_path))
        for option in re.findall(r"--[a-z-]+", command):
            assert option in out, (sub, option)
        failed = _run(command.replace(" [--unmapped background]", "").replace("/data/", f"{tmp_path}/"), tmp_path)
        assert failed.returncode != 0 and "EV1" in failed.stderr + failed.stdout


def test_evaluate_released(tmp_path):
    # the released checkpoints are the authors' files (tests/test_released.py evaluates a checkpoint of the same
    # architecture): the command's options exist, and a missing checkpoint is named
    (command,) = _command("evaluate_released")
    out = _ok(_run(".venv/bin/python -m endoarss_lib.evaluate --help", tmp_path))
    for option in ("--released", "--data-root", "--dataset", "--out"):
        assert option in out, option
    failed = _run(command, tmp_path)  # no data here: the data root is named first
    assert failed.returncode != 0 and "/data/MTLESD" in failed.stderr + failed.stdout
    from endoarss_lib.data import make_synthetic

    make_synthetic(tmp_path / "MTLESD", "mtlesd", n_train=3, n_test=3, image_size=56)
    failed = _run(command.replace("/data/MTLESD", str(tmp_path / "MTLESD")), tmp_path)
    assert failed.returncode != 0 and "mtl_MOLA_DB_MTL_best" in failed.stderr + failed.stdout
    assert not (tmp_path / "released.json").exists()
