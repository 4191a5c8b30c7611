"""endoarss-export: LoRA folded into the frozen weights (closed form W0 + (alpha / r) B A), the torch.export and ONNX
files equal to the PyTorch model on random inputs, and the exported model usable by endoarss-predict.

The tiny run is trained once for the module; the export runs once (ONNX only where its packages are installed: the
``export`` extra). References: the unmerged PyTorch model rebuilt from the run folder, and the merge written out here.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from endoarss_lib.config import preset
from endoarss_lib.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from endoarss_lib.data.registry import get_spec
from endoarss_lib.evaluation import export as export_cli
from endoarss_lib.evaluation.export import export_model, merged_model, missing_onnx_packages
from endoarss_lib.evaluation.inference import load_run_model
from endoarss_lib.evaluation.predict import predict_source
from endoarss_lib.models.lora import LoRALinear, lora_modules
from endoarss_lib.training.engine import build_run_model, read_run_config
from tests.test_predict import SIZE, train_tiny_run

ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data, run = train_tiny_run(root)
    formats = ("pt2",) if missing_onnx_packages() else ("pt2", "onnx")
    record = export_model(run, root / "exported", formats=formats)
    return {"root": root, "data": data, "run": run, "out": root / "exported", "record": record}


def randomise_lora(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Non-zero LoRA factors (a fresh or briefly trained LoRA has B = 0 or close to it: merging would be moot)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model):
            for name, p in m.named_parameters():
                if name.startswith(("lora_", "tesla_A", "tesla_B")):
                    p.copy_(torch.randn(p.shape, generator=generator) * scale)


def outputs(model, x):
    with torch.no_grad():
        return {k: v.float() for k, v in model(x).items()}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_fold_lora_is_w0_plus_scaled_ba_on_the_adapted_chunks():
    cfg = preset("smoke", image_size=SIZE, model={"backbone": "vit_tiny_patch14", "pretrained": False, "arch": "hps"})
    torch.manual_seed(0)
    model = build_run_model(cfg).eval()
    randomise_lora(model)
    wrappers = dict((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrappers and all(m.adapt == (0, 2) and m.chunks == 3 for m in wrappers.values())  # q and v of qkv
    expected = {}
    for name, m in wrappers.items():
        w = m.base.weight.detach().clone()
        cs = m.chunk_size
        for j, chunk in enumerate(m.adapt):
            w[chunk * cs:(chunk + 1) * cs] += m.scale * m.lora_B[j].detach() @ m.lora_A[j].detach()
        expected[name] = w
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    before = outputs(model, x)
    merged, folded = merged_model(model)
    assert folded == len(wrappers)
    for name, w in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear  # a plain layer now
        torch.testing.assert_close(layer.weight, w, atol=1e-6, rtol=0)
        cs = wrappers[name].chunk_size
        torch.testing.assert_close(layer.weight[cs:2 * cs], wrappers[name].base.weight[cs:2 * cs], atol=0, rtol=0)
    assert max_diff(outputs(merged, x), before) <= ATOL
    assert all(m.lora_B.abs().sum() > 0 for m in lora_modules(model))  # the original is untouched
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.zero_()
    assert max_diff(outputs(model, x), before) > 1e-3  # the LoRA matters: the equality above is not trivial


def test_merged_tesla_run_equals_unmerged(exported):
    model = load_run_model(exported["run"])
    randomise_lora(model)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    merged, folded = merged_model(model)
    kept = list(lora_modules(merged))
    assert folded == 0 and kept and all(m.merged and m.num_groups == 2 for m in kept)  # per-task adapters stay
    assert max_diff(outputs(merged, x), outputs(model, x)) <= ATOL


def test_torch_export_program_equals_the_pytorch_model(exported):
    program = torch.export.load(str(exported["out"] / "model.pt2")).module()
    model = load_run_model(exported["run"])
    for batch in (1, 4):  # the batch size is dynamic
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        reference = outputs(model, x)
        got = {k: v.float() for k, v in program(x).items()}
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in reference.items()}
        assert max_diff(got, reference) <= ATOL


def test_onnx_equals_the_pytorch_model(exported):
    missing = missing_onnx_packages()
    if missing:
        pytest.skip(f"ONNX export needs {missing} (pip install 'endoarss[export]'); the torch.export path is tested")
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed (pip install 'endoarss[export]'): the ONNX file cannot be run")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported["out"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    names = [o.name for o in session.get_outputs()]
    assert names == ["cls", "seg"]
    model = load_run_model(exported["run"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(10 + batch))
        got = dict(zip(names, (torch.from_numpy(v).float() for v in session.run(None, {"images": x.numpy()}))))
        assert max_diff(got, outputs(model, x)) <= ATOL
    assert exported["record"]["parity_max_abs_diff"]["onnx"] <= ATOL


def test_record_says_how_to_feed_the_model(exported):
    record = json.loads((exported["out"] / "model.json").read_text())
    assert record == json.loads(json.dumps(exported["record"]))
    cfg = read_run_config(exported["run"])
    spec = get_spec("synthetic_mtlesd")
    assert record["image_size"] == cfg.image_size == SIZE and record["normalize"] == cfg.input_normalization()
    assert record["input"]["mean"] == pytest.approx(IMAGENET_MEAN) and record["input"]["std"] == pytest.approx(
        IMAGENET_STD)
    assert record["activities"] == list(spec.activities) and record["seg_classes"] == list(spec.seg_classes)
    assert record["outputs"]["seg"]["shape"] == ["batch", len(spec.seg_classes), SIZE, SIZE]
    assert record["config_hash"] == cfg.results_hash()
    assert all(v <= ATOL for v in record["parity_max_abs_diff"].values() if v is not None)


def test_predict_runs_the_exported_model(exported, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for p in sorted((exported["data"] / "test").glob("*/image/*.png")):
        shutil.copy(p, frames / p.name)
    predict_source(exported["run"], frames, tmp_path / "eager")
    predict_source(exported["out"] / "model.pt2", frames, tmp_path / "exported")
    eager = pd.read_csv(tmp_path / "eager" / "activities.csv", dtype={"frame": str})
    program = pd.read_csv(tmp_path / "exported" / "activities.csv", dtype={"frame": str})
    assert list(eager.columns) == list(program.columns) and list(eager["frame"]) == list(program["frame"])
    probs = [c for c in eager.columns if c.startswith("p_")]
    np.testing.assert_allclose(program[probs].to_numpy(), eager[probs].to_numpy(), atol=ATOL)
    a = np.stack([np.asarray(Image.open(tmp_path / "eager" / "masks" / f"{n}.png")) for n in eager["frame"]])
    b = np.stack([np.asarray(Image.open(tmp_path / "exported" / "masks" / f"{n}.png")) for n in eager["frame"]])
    assert (a == b).mean() >= 0.999  # equal logits up to 1e-4: only a near-tie pixel may flip
    with pytest.raises(ValueError, match="--image-size 70"):
        predict_source(exported["out"], frames, tmp_path / "other", image_size=70)


def run_main(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = export_cli.main([str(a) for a in argv])
    return code, err.getvalue()


def test_export_errors(exported, tmp_path, monkeypatch):
    code, err = run_main(exported["out"] / "model.pt2", "--out", tmp_path / "again")
    assert code == 2 and "exported model already" in err and "Traceback" not in err
    code, err = run_main(exported["run"], "--out", tmp_path / "x", "--format", "gif")
    assert code == 2 and "--format gif" in err
    code, err = run_main(tmp_path / "nowhere", "--out", tmp_path / "x")
    assert code == 1 and str(tmp_path / "nowhere") in err
    code, err = run_main(exported["run"], "--out", exported["out"], "--format", "pt2")
    assert code == 2 and "--overwrite" in err
    monkeypatch.setattr(export_cli, "missing_onnx_packages", lambda: ["onnx", "onnxscript"])
    code, err = run_main(exported["run"], "--out", tmp_path / "x", "--format", "onnx")
    assert code == 2 and "endoarss[export]" in err and "--format pt2" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "again").exists()
