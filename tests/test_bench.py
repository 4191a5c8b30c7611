"""Throughput / memory measurement: consistent fields, training updates exactly the trainable set, clear errors.

No timed assertions: only invariants that hold however loaded the machine is.
"""
from __future__ import annotations

import math

import pytest
import torch

from endoarss_lib.experiments.bench import (MEMORY_DEFINITIONS, MEMORY_KINDS, PAPER_EFFICIENCY, achieved_tflops,
                                            measure_inference, measure_training, paper_comparison)
from endoarss_lib.models import build_model

SIZE = 28


def tiny(arch="tesla", tasks=("cls", "seg"), **kw):
    torch.manual_seed(0)
    counts = {"num_activities": 3 if "cls" in tasks else None, "num_seg_classes": 4 if "seg" in tasks else None}
    return build_model("vit_tiny_patch14", arch, tasks=tasks, image_size=SIZE, head_channels=8, **counts, **kw)


def check_row(row, batch_size, steps):
    for key in ("elapsed_s", "images_per_s", "ms_per_batch", "weights_mib"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert math.isfinite(row["peak_memory_mib"]) and row["peak_memory_mib"] >= 0
    assert row["images_per_s"] == pytest.approx(batch_size * steps / row["elapsed_s"], rel=1e-12)
    assert row["ms_per_batch"] == pytest.approx(1e3 * row["elapsed_s"] / steps, rel=1e-12)
    assert row["memory_definition"] == MEMORY_DEFINITIONS["cpu"] and row["memory_kind"] == MEMORY_KINDS["cpu"]
    assert {"rss_before_mib", "peak_rss_mib", "peak_reset"} <= set(row)
    assert row["peak_rss_mib"] >= row["rss_before_mib"]
    assert row["device"] == "cpu" and row["device_name"] and row["torch"] == torch.__version__
    assert row["threads"] == torch.get_num_threads() and row["amp"] == "off"
    assert (row["batch_size"], row["steps"], row["image_size"]) == (batch_size, steps, SIZE)


def test_inference_row_is_consistent_and_leaves_the_model_alone():
    model = tiny(sma=True, sma_dim=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    row = measure_inference(model, SIZE, batch_size=3, steps=2, warmup=1)
    check_row(row, 3, 2)
    assert row["mode"] == "inference" and model.training
    assert row["params_total"] == model.parameter_report()["total"]["total"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("weighting", ["ew", "db_mtl", "gm_coord"])
def test_training_changes_trainable_parameters_only(weighting):
    model = tiny().eval()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    row = measure_training(model, SIZE, batch_size=2, steps=1, warmup=1, weighting=weighting, lr=1e-2)
    check_row(row, 2, 1)
    assert row["mode"] == "training" and row["optimizer"] == "Adam" and not model.training
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    changed = [n for n, v in trainable.items() if not torch.equal(params[n], v)]
    assert any(".lora_" in n for n in changed) and any(n.startswith("heads.seg") for n in changed)


def test_training_a_single_task_model():
    row = measure_training(tiny("single", tasks=("seg",)), SIZE, batch_size=2, steps=1, warmup=0)
    check_row(row, 2, 1)


@pytest.mark.parametrize("kwargs, name", [(dict(steps=0), "steps"), (dict(batch_size=0), "batch_size"),
                                          (dict(warmup=-1), "warmup"), (dict(amp="fp8"), "amp"),
                                          (dict(image_size=2.5), "image_size")])
def test_invalid_arguments_name_the_parameter(kwargs, name):
    args = {"image_size": SIZE, **kwargs}
    with pytest.raises(ValueError, match=name):
        measure_inference(tiny(), **args)


def test_invalid_training_arguments():
    with pytest.raises(ValueError, match="unknown weighting"):
        measure_training(tiny(), SIZE, weighting="nope")
    with pytest.raises(ValueError, match="lr"):
        measure_training(tiny(), SIZE, lr=0)


def test_compute_anchor_and_paper_table():
    assert achieved_tflops(35.66, 75.0) == pytest.approx(2.6745)
    fake = {"device_name": "cpu x", "device": "cpu", "image_size": 112, "batch_size": 8, "amp": "off",
            "peak_memory_mib": 10.0, "images_per_s": 4.0, "memory_kind": "kind"}
    table = paper_comparison({**fake, "images_per_s": 2.0}, fake).set_index("quantity")
    paper = table.iloc[:, 0]
    assert paper["training peak memory (MiB)"] == PAPER_EFFICIENCY["train_memory_mib"] == 9858
    assert paper["inference peak memory (MiB)"] == 1668 and paper["inference images/s"] == 35.66
    assert table.loc["inference images/s", "ours"] == 4.0 and table.loc["training images/s", "ours"] == 2.0
