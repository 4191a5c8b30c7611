"""Every command the README and the guides of docs/ show is run here, as written where that is possible on a CPU
without real data, and otherwise in the closest form that still exercises what the command promises (each case says
which and why).

A command is a line of a ```bash block (continuation lines joined, comments dropped) or an inline code span of the
running text whose program (after any leading ``VAR=value``) is one of ``PROGRAMS``, a ``.venv/bin/`` script or an
``endoarss-*`` command. A command added to a page without a case here fails ``test_every_command_has_a_case``; a
case whose command no page shows any more fails the same test.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()

# Pages other engineers are rewriting on their branches right now: not scanned until they are merged (then this list
# is emptied and their commands get cases like the others).
EXCLUDED_DOCS = [
]
PAGES = [ROOT / "README.md"] + [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in EXCLUDED_DOCS]
PROGRAMS = {"make", "python", "python3", "papermill", "pip", "torchrun", "jupyter", "tensorboard", "sphinx-build",
            "ssh", "convmv", "scancel", "sbatch"}


def _is_command(text: str) -> bool:
    words = text.split()
    while words and re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]  # VAR=value before the program; a lone VAR=value is a setting, not a command
    return bool(words) and (words[0] in PROGRAMS or words[0].startswith((".venv/bin/", "endoarss-")))


def page_commands(text: str) -> list[str]:
    """The commands of a page: its ```bash blocks' lines, then its inline command spans."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose):  # a span may wrap onto the next line of its paragraph
        if "\n\n" not in span and _is_command(span.strip()):
            commands.append(re.sub(r"\s+", " ", span.strip()))
    return commands


def readme_commands() -> list[str]:
    return page_commands(README)


def all_commands() -> dict[str, str]:
    """command -> the first page that shows it."""
    found: dict[str, str] = {}
    for page in PAGES:
        for command in page_commands(page.read_text()):
            found.setdefault(command, page.relative_to(ROOT).as_posix())
    return found


# command -> the case (test_<case> below) that runs it
CASES = {
    # -- make targets (make -n: the recipe expands; make test is what CI runs, make demo the quickstart that nbval and
    # the browser test run, make lab starts a server, make executed / bench train and measure for hours)
    "make demo": "make_targets",
    "make test": "make_targets",
    "make lab": "make_targets",
    "make book": "make_targets",
    "make executed": "make_targets",
    "make bench": "make_targets",
    "make tensorboard": "make_targets",
    "make test-browser": "make_targets",
    "ENDOARSS_UPDATE_SCREENSHOT=1 make test-browser": "make_targets",
    ".venv/bin/jupyter lab --ServerApp.ip=127.0.0.1 notebooks": "lab_command",
    "ssh -L 8888:127.0.0.1:8888 host": "lab_command",
    # -- notebooks
    ".venv/bin/papermill notebooks/00_quickstart.ipynb out.ipynb -p dataset mtlendovis -p image_size 224 -p epochs 50 "
    "-p device cuda": "papermill_example",
    ".venv/bin/papermill notebooks/04_ablation_components.ipynb out.ipynb -y \"seeds: [0, 1, 2]\"": "papermill_seeds",
    "papermill notebooks/04_ablation_components.ipynb out.ipynb -y \"seeds: [0, 1, 2]\"": "papermill_seeds",
    "papermill -p name value": "papermill_help",
    "papermill --help-notebook NOTEBOOK": "papermill_help",
    "papermill --help-notebook": "papermill_help",
    "papermill --help-notebook notebooks/00_quickstart.ipynb": "papermill_help",
    "python scripts/notebook_outputs.py book": "book_command",
    "python scripts/demonstration_runs.py --list": "demonstration_runs",
    "python scripts/demonstration_runs.py": "demonstration_runs",
    # -- training
    ".venv/bin/python -m endoarss_lib.train --preset smoke": "train_smoke",
    ".venv/bin/python -m endoarss_lib.train --help": "train_help",
    "python -m endoarss_lib.train --help": "train_help",
    "python -m endoarss_lib.train --config results/demonstration/<run>/config.json": "train_smoke",
    ".venv/bin/python -m endoarss_lib.train --preset paper dataset=mtlendovis data_root=/data/MTLEndovis "
    "--print-config": "train_print_config",
    ".venv/bin/python -m endoarss_lib.train --preset paper dataset=mtlesd data_root=/data/MTLESD "
    "model.pretrained=/weights/dinov2_vitb14_pretrain.pth": "train_paper",
    "python -m endoarss_lib.train --preset paper dataset=mtlesd data_root=/data/MTLESD": "train_paper",
    "torchrun --nproc_per_node 4 -m endoarss_lib.train --config my_run.yaml": "train_torchrun",
    "torchrun --nproc_per_node 4 -m endoarss_lib.train --preset paper data_root=/data/MTLESD": "train_torchrun",
    "torchrun": "train_torchrun",
    "python -m endoarss_lib.train --preset smoke tensorboard=true diagnostics_every=5": "train_tensorboard",
    # -- sweeps
    ".venv/bin/python -m endoarss_lib.experiments.sweep results/grids/table2_smoke.yaml --jobs 2": "sweep",
    "python -m endoarss_lib.experiments.sweep results/grids/table2_smoke.yaml --jobs 2": "sweep",
    "python -m endoarss_lib.experiments.sweep": "sweep",
    "python -m endoarss_lib.experiments.sweep results/grids/table2_smoke.yaml --executor slurm --partition gpu "
    "--gpus-per-job 1 --time-limit 4:00:00 --jobs 8 --slurm-arg account=myproject": "sweep_slurm",
    # -- data
    ".venv/bin/python -m endoarss_lib.data.prepare sources": "prepare_sources",
    "python -m endoarss_lib.data.prepare sources": "prepare_sources",
    ".venv/bin/python -m endoarss_lib.data.prepare validate /data/MTLESD --dataset mtlesd": "prepare_validate",
    "python -m endoarss_lib.data.prepare validate /data/MTLESD --dataset mtlesd": "prepare_validate",
    "python -m endoarss_lib.data.prepare validate ROOT --dataset NAME": "prepare_validate",
    "python -m endoarss_lib.data.prepare endovis18 --frames EV18 --type-masks ISINET_TYPES --vqla EV18_VQLA "
    "--out /data/MTLEndovis": "prepare_converters",
    "python -m endoarss_lib.data.prepare endovis17 --frames EV17 --type-masks EV17_TYPES --vqla EV17_VQLA "
    "--out /data/MTLEndovis-Gen --unmapped background": "prepare_converters",
    "python -m endoarss_lib.data.prepare colour-masks --palette ...": "prepare_colour_masks",
    "convmv -f latin1 -t utf8 --notest -r ROOT": "convmv",
    # -- evaluation of the authors' checkpoints
    ".venv/bin/python -m endoarss_lib.evaluate --released mtl_MOLA_DB_MTL_best_cls_w=1_seg_w=1_dinonet.pt "
    "--data-root /data/MTLESD --dataset mtlesd --out released.json": "evaluate_released",
    "python -m endoarss_lib.evaluate --released /path/to/mtl_MOLA_DB_MTL_best_cls_w=1_seg_w=1_dinonet.pt "
    "--data-root /data/MTLESD --dataset mtlesd --image-size 244 --device cuda --out released_mtlesd.json":
        "evaluate_released",
    "python -m endoarss_lib.evaluate --released /path/to/mtl_MOLA_STCH_best_cls_w=1_seg_w=1_dinonet.pt "
    "--data-root /data/MTLEndovis --dataset mtlendovis --out released_mtlendovis.json": "evaluate_released",
    "endoarss-evaluate --released": "evaluate_released",
    "python -m endoarss_lib.evaluate --help": "tools",
    "python -m endoarss_lib.evaluate": "tools",
    "endoarss-train": "tools",
    "python -m endoarss_lib.<tool>": "tools",
    "OMP_NUM_THREADS=1 python -m pytest -q tests/test_released.py": "released_tests",
    # -- the bundled backbone
    ".venv/bin/python -m endoarss_lib.foundation --out endoarss_lib/weights": "pretrain",
    "python -m endoarss_lib.foundation --out endoarss_lib/weights": "pretrain",
    # -- installing extras
    "pip install -c constraints.txt -e \".[notebooks,test]\"": "pip_extras",
    "pip install \"endoarss[cluster]\"": "pip_extras",
    "pip install \"endoarss[tensorboard]\"": "pip_extras",
    # -- installing (docs/install.md)
    "make install": "make_install",
    "make install TORCH=cpu": "make_install",
    "make install TORCH=cu126": "make_install",
    "make install TORCH=cu130": "make_install",
    "make install LOCK=": "make_install",
    "make lock": "make_install",
    "make": "make_install",
    "pip install -c constraints.txt -c requirements-lock.txt -e \".[notebooks,test]\"": "pip_local",
    "pip install .": "pip_local",
    "pip install \".[notebooks]\"": "pip_local",
    "pip install -c constraints.txt .": "pip_local",
    "pip install -c constraints.txt -c requirements-lock.txt .": "pip_local",
    "pip install 'endoarss[export]'": "pip_extras",
    "find results -name result.json -execdir rm -f last.pt \\;": "find_checkpoints",
    # -- the tools named in running text (docs/install.md, training.md, predict.md)
    "python -m <module>": "tools",
    "endoarss-sweep": "tools",
    "endoarss-prepare": "tools",
    "endoarss-evaluate": "tools",
    "endoarss-pretrain": "tools",
    "endoarss-predict": "tools",
    "endoarss-export": "tools",
    "endoarss-evaluate --run": "tools",
    "endoarss-predict MODEL SOURCE --out DIR": "tools",
    "endoarss-evaluate --run RUN_DIR": "tools",
    "endoarss-export RUN_DIR --out DIR": "tools",
    "python -m endoarss_lib.train --quiet": "tools",
    "endoarss-pretrain --quiet": "tools",
    "endoarss-sweep --jobs N": "tools",
    # -- a trained model on new frames (docs/predict.md)
    "python -m endoarss_lib.train --preset smoke out_dir=runs run_name=smoke": "predict_commands",
    "endoarss-predict runs/smoke frames --out predictions": "predict_commands",
    "endoarss-predict runs/smoke clip.mp4 --every 5 --out predictions_clip --video overlay.mp4": "predict_commands",
    "endoarss-evaluate --run runs/smoke": "predict_commands",
    "endoarss-evaluate --run runs/mtlendovis-run --dataset mtlendovis_gen --data-root /data/MTLEndovis-Gen "
    "--device cuda": "predict_commands",
    "endoarss-export runs/smoke --out exported": "predict_commands",
    "endoarss-predict exported/model.pt2 frames --out predictions_pt2": "predict_commands",
    # -- benchmarks
    "python benchmarks/bench_weighting.py --backbone vit_mini_patch14 --rounds 7": "bench_weighting",
    "python benchmarks/bench_data.py --repeats 7": "bench_data",
    "python benchmarks/bench_gpu.py": "bench_gpu",
    "python benchmarks/bench_training.py": "bench_training",
}


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ENDOARSS_DATA": str(tmp_path / "data")}


def _run(command: str, tmp_path: Path, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """A page's command with ``.venv/bin/`` meaning this environment's scripts and ``python`` this Python."""
    argv = shlex.split(command)
    env = _env(tmp_path)
    while argv and re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", argv[0]):
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    if argv[0].startswith(".venv/bin/"):
        argv[0] = str(BIN / argv[0].removeprefix(".venv/bin/"))
    elif argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    elif (BIN / argv[0]).is_file():
        argv[0] = str(BIN / argv[0])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(argv, cwd=cwd or tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def _command(case: str) -> list[str]:
    return [c for c, k in CASES.items() if k == case]


def _distinct(commands: list[str]) -> list[str]:
    """The commands once each, ``.venv/bin/X`` and ``X`` counted as one (the same program here)."""
    seen, out = set(), []
    for command in commands:
        key = re.sub(r"^\.venv/bin/", "", command)
        if key not in seen:
            seen.add(key)
            out.append(command)
    return out


def test_every_command_has_a_case():
    commands = all_commands()
    missing = [f"{page}: {c}" for c, page in commands.items() if c not in CASES]
    assert not missing, f"commands without a case in {Path(__file__).name}:\n  " + "\n  ".join(missing)
    stale = [c for c in CASES if c not in commands]
    assert not stale, f"cases for commands no page shows any more: {stale}"
    tests = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert not set(CASES.values()) - tests, set(CASES.values()) - tests


def test_the_command_scan_finds_blocks_and_inline_commands():
    page = ("Run `make demo`, set `ENDOARSS_ALLOW_HUB=1`, call `build_model(...)` or `OMP_NUM_THREADS=1 python -m x`.\n"
            "```bash\nmake test   # all\n.venv/bin/python -m a \\\n    --b c\n```\n```python\nimport os\n```\n"
            "`endoarss-train --help` and `-p seeds 0`, `make\nbook`.\n")
    assert page_commands(page) == ["make test", ".venv/bin/python -m a --b c", "make demo",
                                   "OMP_NUM_THREADS=1 python -m x", "endoarss-train --help", "make book"]


def test_the_readme_keeps_its_generated_section_and_names_every_command():
    assert README.count("<!-- measured:start -->") == 1 and README.count("<!-- measured:end -->") == 1
    assert README.index("<!-- measured:start -->") < README.index("<!-- measured:end -->")
    for script in ("endoarss-train", "endoarss-predict", "endoarss-evaluate", "endoarss-export"):
        assert script in README, script
    assert "SYNTHETIC" in README and "synthetic-pretrained backbone" in README
    assert "docs/img/jupyterlab_quickstart.png" in README and (ROOT / "docs/img/jupyterlab_quickstart.png").is_file()
    assert '-p seeds "[0, 1, 2]"' not in README  # a list goes through -y (YAML); -p passes it as text


def test_make_targets(tmp_path):
    for command in _command("make_targets"):
        out = _ok(_run(f"make -n {command.split()[-1]}", tmp_path, cwd=ROOT))
        assert out.strip(), command
    assert "00_quickstart" in _ok(_run("make -n demo", tmp_path, cwd=ROOT))
    assert "notebook_outputs.py book" in _ok(_run("make -n book", tmp_path, cwd=ROOT))
    assert "test_browser.py" in _ok(_run("make -n test-browser", tmp_path, cwd=ROOT))


def test_lab_command(tmp_path):
    # make lab's recipe is the documented jupyter command (a server is not started here); the ssh tunnel forwards
    # JupyterLab's default port on the loopback address the Lab listens on
    recipe = _ok(_run("make -n lab", tmp_path, cwd=ROOT))
    (lab,) = [c for c in _command("lab_command") if "jupyter" in c]
    words = shlex.split(lab)
    assert all(w in recipe for w in words[1:]), (lab, recipe)
    assert "--port" not in recipe  # the default port, 8888, as the tunnel assumes
    (ssh,) = [c for c in _command("lab_command") if c.startswith("ssh")]
    forward = shlex.split(ssh)[2].split(":")
    assert forward[1:] == ["127.0.0.1", "8888"] and "--ServerApp.ip=127.0.0.1" in recipe
    assert (BIN / "jupyter").is_file()


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


def test_papermill_seeds(tmp_path):
    # As written, but --prepare-only (three seeds train three runs per variant): -y passes YAML, so the injected cell
    # holds the list [0, 1, 2], and the notebook's parameter check reads it as the three seeds
    import nbformat

    for command in _distinct(_command("papermill_seeds")):
        out = tmp_path / "out.ipynb"
        _ok(_run(command.replace("notebooks/", f"{ROOT}/notebooks/").replace(" out.ipynb", f" {out}")
                 + " --prepare-only", tmp_path))
        nb = nbformat.read(out, as_version=4)
        injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
        assert re.search(r"^seeds = \[0, 1, 2\]$", injected.source, re.M), injected.source  # a list, not "[0, 1, 2]"
        first = [c.source for c in nb.cells if c.cell_type == "code"][:3]
        (tmp_path / "cells.py").write_text("\n".join(first) + "\nprint(list(exp.seeds))\n")
        assert _ok(_run(f"{sys.executable} cells.py", tmp_path)).strip().splitlines()[-1] == "[0, 1, 2]"


def test_papermill_help(tmp_path):
    # the placeholders filled in (NOTEBOOK: the quickstart): --help-notebook lists the typed parameters with their
    # help, and papermill's -p takes a name and a value
    out = _ok(_run(".venv/bin/papermill --help-notebook notebooks/00_quickstart.ipynb", tmp_path, cwd=ROOT))
    assert "scale: str (default \"test\")" in out and "seed: int (default 0)" in out
    assert "-p, --parameters TEXT..." in _ok(_run(".venv/bin/papermill --help", tmp_path))


def test_book_command(tmp_path):
    # the CLI of tests/test_book.py's build (which builds the whole book, about 25 s): here the command's options
    out = _ok(_run("python scripts/notebook_outputs.py --help", tmp_path, cwd=ROOT))
    assert "book" in out and "--out" in out


def test_demonstration_runs(tmp_path):
    # --list as written (it trains nothing); the full command trains 69 runs for about 12-13 hours on 2 cores (docs/evidence.md):
    # its --only option, which the page names, exists
    out = _ok(_run("python scripts/demonstration_runs.py --list", tmp_path, cwd=ROOT))
    assert re.search(r"\b\d+ runs?\b", out), out[-500:]
    assert "--only" in _ok(_run("python scripts/demonstration_runs.py --help", tmp_path, cwd=ROOT))


def test_demonstration_order_finishes_whole_notebooks():
    # the training order: every run once, the featured MTLESD runs first, and after each step the notebook it names
    # has every run it needs (whatever a later notebook shares with it)
    import importlib.util

    spec = importlib.util.spec_from_file_location("demonstration_runs", ROOT / "scripts" / "demonstration_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    work = module.plan("test")
    runs, steps = module.ordered(work)

    def run_id(c):
        return c.dataset, c.results_hash()

    needed = {run_id(c) for _, configs in work for c in configs.values()}
    assert sorted(map(run_id, runs.values())) == sorted(needed)  # each needed run exactly once
    order = [run_id(c) for c in runs.values()]
    featured = [c for c in runs.values() if c.model.arch == "tesla" and c.model.sma and c.dataset == "mtlesd"][:1]
    assert featured and order[0] == run_id(featured[0])
    done = 0
    for what, names in steps:
        done += len(names)
        if what in dict(work):
            assert {run_id(c) for c in dict(work)[what].values()} <= set(order[:done]), what
    assert done == len(runs) and [w for w, _ in steps[1:]] == list(dict.fromkeys(w for w, _ in steps[1:]))


def test_train_smoke(tmp_path):
    # as written: the smoke preset trains the frozen synthetic-pretrained ViT + LoRA + TESLA on synthetic data
    (command, from_config) = _command("train_smoke")
    out = _ok(_run(command, tmp_path))
    result = json.loads(out[out.index("{"):])
    assert result["pretrained_name"] == "synthdino_vit_mini14" and result["data"] == "synthetic"
    assert result["test_cls_accuracy"] > result["test_cls_majority_accuracy"]
    run_dir = tmp_path / result["run_dir"]
    assert (run_dir / "result.json").is_file()
    # docs/evidence.md: a run again from its recorded config (here the smoke run's folder in place of a demonstration
    # run's): the same config hash, and the finished run is found, not trained again
    stamp = (run_dir / "result.json").stat().st_mtime_ns
    again = _ok(_run(from_config.replace("results/demonstration/<run>", str(run_dir)), tmp_path))
    assert json.loads(again[again.index("{"):])["test_cls_accuracy"] == result["test_cls_accuracy"]  # the same row
    assert json.loads((run_dir / "result.json").read_text())["config_hash"] == result["config_hash"]
    assert (run_dir / "result.json").stat().st_mtime_ns == stamp, "the finished run was trained again"


def test_train_help(tmp_path):
    for command in _distinct(_command("train_help")):
        out = _ok(_run(command, tmp_path))
        for field in ("epochs", "weighting", "select_on", "backbone", "lora_rank"):
            assert field in out, field


def test_train_print_config(tmp_path):
    (command,) = _command("train_print_config")
    out = _ok(_run(command, tmp_path))
    assert "preset: paper" in out and "dataset: mtlendovis" in out and "data_root: /data/MTLEndovis" in out
    assert "synthetic: false" in out and "lr: 0.001" in out  # the paper's MTLEndovis learning rate


def test_train_paper(tmp_path):
    # The paper's setting needs the real data, DINOv2 weights and a GPU: the same commands with --print-config
    # resolve it (preset, model, weights path); without the files a run stops naming them.
    for command in _command("train_paper"):
        out = _ok(_run(command + " --print-config", tmp_path))
        assert "preset: paper" in out and "backbone: dinov2_vitb14" in out
        assert "weighting: db_mtl" in out and "lr: 0.0001" in out  # the paper's MTLESD setting
        if "model.pretrained" in command:
            assert "pretrained: /weights/dinov2_vitb14_pretrain.pth" in out
            failed = _run(command + " epochs=1", tmp_path)
            assert failed.returncode != 0 and "/data/MTLESD" in failed.stderr + failed.stdout


def test_train_torchrun(tmp_path):
    # torchrun with 4 processes needs 4 devices (the data-parallel engine itself is tests/test_distributed.py): the
    # commands' torchrun exists, and the same training arguments without torchrun resolve (a YAML file is read and
    # typed; the paper preset takes the data root)
    assert (BIN / "torchrun").is_file()
    (tmp_path / "my_run.yaml").write_text("preset: smoke\nepochs: 3\nweighting: db_mtl\nmodel:\n  arch: hps\n")
    for command in _command("train_torchrun"):
        if command == "torchrun":
            continue
        args = command.split(" -m endoarss_lib.train ", 1)[1]
        out = _ok(_run(f"python -m endoarss_lib.train {args} --print-config", tmp_path))
        if "my_run.yaml" in args:
            assert "epochs: 3" in out and "weighting: db_mtl" in out and "arch: hps" in out
        else:
            assert "preset: paper" in out and "data_root: /data/MTLESD" in out


def test_train_tensorboard(tmp_path):
    # The training itself writes the event files in tests/test_tensorboard.py; here the command as written, with
    # --print-config: both overrides are typed and taken, and the optional package it needs is installed
    (command,) = _command("train_tensorboard")
    out = _ok(_run(command + " --print-config", tmp_path))
    assert "tensorboard: true" in out and "diagnostics_every: 5" in out
    import importlib.util

    assert importlib.util.find_spec("tensorboard") is not None


def test_sweep(tmp_path):
    # --dry-run (the grid trains 8 configurations): the grid file is read and its configurations listed, nothing
    # trained or written; the bare module name answers --help
    for command in _distinct(_command("sweep")):
        if command.endswith("experiments.sweep"):
            assert "--jobs" in _ok(_run(command + " --help", tmp_path))
            continue
        out = _ok(_run(command + " --dry-run", tmp_path, cwd=ROOT))
        assert out.count("todo") + out.count("done") >= 2, out[-1000:]


def test_sweep_slurm(tmp_path):
    # Needs a Slurm cluster: the same command with --dry-run reads the grid and the Slurm options (submitit, the
    # cluster extra, is installed with the test extra), submitting nothing
    (command,) = _command("sweep_slurm")
    import importlib.util

    assert importlib.util.find_spec("submitit") is not None
    out = _run(command + " --dry-run", tmp_path, cwd=ROOT)
    assert out.returncode == 0 or "slurm" in (out.stderr + out.stdout).lower(), out.stderr[-1000:]
    help_text = _ok(_run("python -m endoarss_lib.experiments.sweep --help", tmp_path))
    for option in re.findall(r"--[a-z-]+", command):
        assert option in help_text, option


def test_prepare_sources(tmp_path):
    for command in _distinct(_command("prepare_sources")):
        out = _ok(_run(command, tmp_path))
        assert "MTLESD" in out and "EndoVis" in out


def test_prepare_validate(tmp_path):
    # as written, on a dataset folder in the real layout (synthetic here; ROOT and NAME filled in): every file decoded
    from endoarss_lib.data import make_synthetic

    make_synthetic(tmp_path / "MTLESD", "mtlesd", n_train=6, n_test=3, image_size=56)
    for command in _distinct(_command("prepare_validate")):
        command = command.replace("/data/MTLESD", str(tmp_path / "MTLESD")).replace("ROOT", str(tmp_path / "MTLESD"))
        out = _ok(_run(command.replace("NAME", "mtlesd"), tmp_path))
        assert "OK" in out or "ok" in out.lower()
    (tmp_path / "MTLESD" / "train" / "1" / "mask").rename(tmp_path / "MTLESD" / "train" / "1" / "masks")
    failed = _run(f"python -m endoarss_lib.data.prepare validate {tmp_path / 'MTLESD'} --dataset mtlesd", tmp_path)
    assert failed.returncode == 1  # a problem found: exit status 1, as docs/data.md says


def test_prepare_converters(tmp_path):
    # the converters need EndoVis frames (tests/test_prepare.py converts fabricated EndoVis layouts); here: the
    # commands exist with the options the pages give, and a missing source folder is named
    for command in _command("prepare_converters"):
        sub = command.split()[3]
        out = _ok(_run(f"python -m endoarss_lib.data.prepare {sub} --help", tmp_path))
        for option in re.findall(r"--[a-z-]+", command):
            assert option in out, (sub, option)
        failed = _run(command.replace("/data/", f"{tmp_path}/"), tmp_path)
        assert failed.returncode != 0 and "EV1" in failed.stderr + failed.stdout


def test_prepare_colour_masks(tmp_path):
    # the subcommand troubleshooting.md names exists and takes --palette
    (command,) = _command("prepare_colour_masks")
    out = _ok(_run(command.replace(" --palette ...", " --help"), tmp_path))
    assert "--palette" in out


def test_convmv(tmp_path):
    # convmv is not part of the project (troubleshooting.md suggests it); run as written where it is installed: a
    # Latin-1 file name becomes UTF-8
    if shutil.which("convmv") is None:
        pytest.skip("convmv is not installed (apt-get install convmv); the command is a third-party tool's")
    (command,) = _command("convmv")
    root = tmp_path / "root"
    root.mkdir()
    (root / "caf\xe9.png".encode("latin-1").decode("utf-8", "surrogateescape")).write_bytes(b"x")
    # convmv prints the old (Latin-1) name: its output is bytes, not UTF-8 text
    result = subprocess.run(shlex.split(command.replace("ROOT", str(root))), cwd=tmp_path, capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-2000:]
    assert [p.name for p in root.iterdir()] == ["caf\xe9.png"]


def test_evaluate_released(tmp_path):
    # the released checkpoints are the authors' files (tests/test_released.py evaluates a checkpoint of the same
    # architecture): the commands' options exist, and a missing checkpoint is named
    help_text = _ok(_run("python -m endoarss_lib.evaluate --help", tmp_path))
    from endoarss_lib.data import make_synthetic

    make_synthetic(tmp_path / "MTLESD", "mtlesd", n_train=3, n_test=3, image_size=56)
    for command in _command("evaluate_released"):
        for option in re.findall(r"--[a-z-]+", command):
            assert option in help_text, option
        if command == "endoarss-evaluate --released":
            assert (BIN / "endoarss-evaluate").is_file()
            continue
        command = command.replace(" --device cuda", " --device cpu")  # no GPU here
        failed = _run(command, tmp_path)  # no data here: the data root is named first
        root = re.search(r"--data-root (\S+)", command).group(1)
        assert failed.returncode != 0 and root in failed.stderr + failed.stdout
        if "mtlesd" in command:
            failed = _run(command.replace("/data/MTLESD", str(tmp_path / "MTLESD")), tmp_path)
            assert failed.returncode != 0 and "mtl_MOLA_DB_MTL_best" in failed.stderr + failed.stdout
    assert not list(tmp_path.glob("released*.json"))


def test_tools(tmp_path, capsys):
    # troubleshooting.md: every command-line tool exists as a console script and as python -m endoarss_lib.<tool>
    # (one subprocess: the module form), answers --version, and a wrong command line is an error with status 2
    # (each tool's main, in this process: five interpreters starting torch would take minutes on 2 cores)
    import importlib

    tools = {"endoarss-train": "train", "endoarss-evaluate": "evaluate", "endoarss-prepare": "data.prepare",
             "endoarss-sweep": "experiments.sweep", "endoarss-pretrain": "foundation",
             "endoarss-predict": "evaluation.predict", "endoarss-export": "evaluation.export"}
    for script, module in tools.items():
        assert (BIN / script).is_file(), script
        main = importlib.import_module(f"endoarss_lib.{module}").main

        def call(argv):
            try:
                return main(argv) or 0
            except SystemExit as exc:
                return exc.code or 0

        assert call(["--version"]) == 0 and re.search(r"\d+\.\d+", capsys.readouterr().out), module
        code = call(["--no-such-option"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and "error:" in err, (module, code, err[-500:])
    assert "--released" in _ok(_run("python -m endoarss_lib.evaluate --help", tmp_path))


def test_released_tests(tmp_path):
    # the test file released_model.md points to: collected, not run again here (the suite runs it)
    (command,) = _command("released_tests")
    out = _ok(_run(command + " --collect-only -p no:cacheprovider", tmp_path, cwd=ROOT))
    assert int(re.search(r"(\d+) tests? collected", out).group(1)) > 0, out[-500:]


def test_pretrain(tmp_path):
    # As written it pretrains for about an hour; the closest form: the same command on a tiny ViT for 2 steps on 8
    # small images, into a temporary folder: it writes the weights and their record (name, sha256)
    (command, *_) = _command("pretrain")
    out = tmp_path / "weights"
    tiny = (" --backbone vit_tiny_patch14 --steps 2 --pool-size 8 --render-size 56 --global-size 28 --local-size 14 "
            "--batch-size 4 --no-eval --name tiny_test")
    _ok(_run(command.replace("endoarss_lib/weights", str(out)) + tiny, tmp_path, timeout=600))
    record = json.loads((out / "tiny_test.json").read_text())
    import hashlib

    digest = hashlib.sha256((out / "tiny_test.safetensors").read_bytes()).hexdigest()
    assert digest in json.dumps(record), "the record names the weights' sha256"


def test_pip_extras(tmp_path):
    # No package index is assumed reachable in tests: the extras the commands install are declared, and what they
    # install is present in this environment (which `make install` made with the first command)
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for command in _command("pip_extras"):
        for group in re.search(r"\[([a-z,]+)\]", command).group(1).split(","):
            assert group in extras, (command, group)
            for requirement in extras[group]:
                importlib.metadata.version(Requirement(requirement).name)  # raises if missing
    assert (ROOT / "constraints.txt").is_file()


def test_bench_data(tmp_path):
    # as written it times 7 passes over 48 frames of 512 px; the closest fast form: 6 small frames, 1 pass; the table
    # has both augment settings and the cached / uncached ratio
    (command,) = _command("bench_data")
    out = _ok(_run(command.replace("--repeats 7", "--repeats 1 --n 6 --source-size 64 --image-size 56"), tmp_path,
                   cwd=ROOT))
    assert re.search(r"^False\s.*x\s", out, re.M) and re.search(r"^True\s.*x\s", out, re.M), out


def test_bench_training(tmp_path):
    # as written: the featured model at 224 px, batch 8, 5 interleaved repeats (minutes); the closest fast form: 56 px,
    # batch 2, one repeat on one thread; the three sections and the ratios against the featured model
    (command,) = _command("bench_training")
    out = _ok(_run(command + " --image-size 56 --batch 2 --repeats 1 --threads 1", tmp_path, cwd=ROOT))
    assert re.search(r"^featured\s+[\d.]+ s/step .* speed x 1\.00 vs featured", out, re.M), out[-1500:]
    assert re.search(r"^no SMA\s+[\d.]+ s/step", out, re.M)
    assert "== 3. Operators by self CPU time" in out
    share = float(re.search(r"convolutions \(mm / matmul / linear / conv\): ([\d.]+) %", out).group(1))
    assert 0 < share <= 100
    # section 1's featured total is the FLOP count of the featured model at that size (FlopCounterMode, forward)
    from endoarss_lib.evidence.variants import FEATURED_MODEL
    from endoarss_lib.models import build_model, count_gflops

    opts = dict(FEATURED_MODEL)
    model = build_model(opts.pop("backbone"), opts.pop("arch"), sma=opts.pop("sma"), num_activities=7,
                        num_seg_classes=9, image_size=56, **opts)
    total = float(re.search(r"^featured\s+total\s+([\d.]+)", out, re.M).group(1))
    assert abs(total - count_gflops(model, 56)) < 0.006


def test_bench_gpu(tmp_path):
    # Without CUDA the command as written measures the --tiny configuration on the CPU (a few minutes with
    # torch.compile: tests/test_bench_gpu.py runs it); here: asking for CUDA on this machine says so and exits 2
    import torch

    (command,) = _command("bench_gpu")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: tests/test_bench_gpu.py measures it")
    failed = _run(command + " --device cuda", tmp_path, cwd=ROOT)
    assert failed.returncode == 2 and "no CUDA device" in failed.stderr + failed.stdout


def test_make_install(tmp_path):
    # make -n: the recipe each install route expands to (installing CUDA builds needs the PyTorch index, unreachable
    # here; tests/test_install.py runs the recipes against a fake .venv): the route's index URL appears in it
    for command in _command("make_install"):
        out = _ok(_run(f"make -n {command.removeprefix('make').strip()}", tmp_path, cwd=ROOT))
        assert out.strip(), command
        route = re.search(r"TORCH=(\w+)", command)
        if route:
            assert f"download.pytorch.org/whl/{route.group(1)}" in out, (command, out[-800:])
        if command == "make lock":
            assert "requirements-lock.txt" in out, out[-800:]
        if command == "make install LOCK=":
            assert "requirements-lock.txt" not in out, out[-800:]


def test_pip_local(tmp_path):
    # as written they install this checkout; the closest offline form resolves the same requirement without
    # installing or fetching anything (--dry-run, no index, no dependencies, the local build backend)
    for command in _command("pip_local"):
        argv = shlex.split(command)[2:]
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
                                 "--no-build-isolation", "-q", "--report", str(tmp_path / "report.json"), *argv],
                                cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={**_env(tmp_path), "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": ""})
        _ok(result)
        report = json.loads((tmp_path / "report.json").read_text())
        assert [item["metadata"]["name"] for item in report["install"]] == ["endoarss"], (command, report["install"])


def test_find_checkpoints(tmp_path):
    # install.md's disk cleanup: the resume checkpoint of finished runs goes, an unfinished run keeps its own
    (command,) = _command("find_checkpoints")
    finished, running = tmp_path / "results" / "runs" / "a", tmp_path / "results" / "runs" / "b"
    for folder in (finished, running):
        folder.mkdir(parents=True)
        (folder / "last.pt").write_bytes(b"x")
        (folder / "best.pt").write_bytes(b"x")
    (finished / "result.json").write_text("{}")
    _ok(subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60))
    assert not (finished / "last.pt").exists() and (finished / "best.pt").exists()
    assert (running / "last.pt").exists()


def test_predict_commands(tmp_path):
    # predict.md's walk-through in its closest fast form: the smoke run at 56 px for 1 epoch on the test-size ViT
    # (as written: 112 px, 3 epochs, about 2 minutes), its test images as frames/, a 12-frame clip; the export as
    # .pt2 only (ONNX translation takes half a minute: tests/test_export.py checks it); the cross-dataset evaluation
    # on the run's own synthetic data (no MTLEndovis-Gen here, no CUDA)
    import cv2
    import numpy as np
    from PIL import Image

    commands = _command("predict_commands")
    train = next(c for c in commands if "endoarss_lib.train" in c)
    _ok(_run(train + " image_size=56 epochs=1 model.backbone=vit_tiny_patch14 model.pretrained=false "
                     "synthetic_n_train=12 synthetic_n_test=6 device=cpu --quiet", tmp_path))
    # the synthetic data the run trained on, generated under this test's data home (ENDOARSS_DATA)
    (data_root,) = {p.parent for p in (tmp_path / "data").rglob("test") if (p.parent / "train").is_dir()}
    from endoarss_lib.data import MTLDataset

    frames = tmp_path / "frames"
    frames.mkdir()
    images = []
    for sample in MTLDataset(data_root, "test", dataset="mtlesd", image_size=56).samples:
        (frames / sample.image.name).write_bytes(sample.image.read_bytes())
        images.append(np.asarray(Image.open(sample.image).convert("RGB")))
    writer = cv2.VideoWriter(str(tmp_path / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, (56, 56))
    for i in range(12):
        writer.write(cv2.cvtColor(images[i % len(images)], cv2.COLOR_RGB2BGR))
    writer.release()
    for command in commands:
        if command is train:
            continue
        if "--dataset mtlendovis_gen" in command:
            command = f"endoarss-evaluate --run runs/smoke --dataset mtlesd --data-root {data_root} --device cpu"
        if command.startswith("endoarss-export"):
            command += " --format pt2"
        _ok(_run(command, tmp_path, timeout=600))
    assert len(list((tmp_path / "predictions" / "masks").glob("*.png"))) == len(images)
    assert len((tmp_path / "predictions_clip" / "activities.csv").read_text().splitlines()) == 1 + 3  # 0, 5, 10
    assert (tmp_path / "predictions_clip" / "overlay.mp4").stat().st_size > 0
    assert (tmp_path / "exported" / "model.pt2").is_file()
    assert len((tmp_path / "predictions_pt2" / "activities.csv").read_text().splitlines()) == 1 + len(images)


def test_bench_weighting(tmp_path):
    # as written: 7 interleaved rounds of every weighting on the featured ViT (minutes); the closest fast form: one
    # round on the test-size ViT at 56 px; the table still has every method relative to EW
    (command,) = _command("bench_weighting")
    out = _ok(_run(command.replace("--backbone vit_mini_patch14 --rounds 7",
                                   "--backbone vit_tiny_patch14 --rounds 1 --image-size 56 --batch 2"),
                   tmp_path, cwd=ROOT, timeout=600))
    assert re.search(r"^DB-MTL \[loop\]\s+[\d.]+\s+[\d.]+", out, re.M) and re.search(r"^EW\s", out, re.M), out[-1500:]
