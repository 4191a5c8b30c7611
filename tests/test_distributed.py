"""Data parallel is exact: 2 gloo processes, each on half of every global batch, end where 1 process on the whole
batches ends (parameters, BatchNorm statistics, the weighting's state), within 1e-6 and identically on both ranks.

The engine's own pieces run in both: ``_build_state`` (which prepares data parallel) and ``_train_epoch`` (the
weighting hand-off, the gradient averaging, DDP). The reference is the single-process run of the same code. A
negative control shows what the test detects: the previous scheme (each rank combines its own task gradients with
its own BatchNorm statistics, then the combined gradients are averaged) ends measurably elsewhere.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import default_collate

from endoarss_lib.config import TrainConfig, preset
from endoarss_lib.models.backbones import GroupBatchNorm2d
from endoarss_lib.training import engine
from endoarss_lib.training.distributed import GlobalBatchNorm2d, GlobalGroupBatchNorm2d, uses_ddp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WORLD, GLOBAL_BATCH, STEPS, EPOCHS, LR, TOL = 2, 4, 2, 2, 0.01, 1e-6
VIT = {"backbone": "vit_tiny_patch14", "arch": "tesla", "pretrained": False, "seg_dropout": 0.0}
RESNET = {"backbone": "resnet_tiny", "pretrained": False, "seg_dropout": 0.0}
CASES = {  # name: (config fields, whether DDP wraps the model)
    "db_mtl-vit-tesla": (dict(weighting="db_mtl", model=VIT), False),       # gradient method, BatchNorm in heads
    "stch-vit-tesla": (dict(weighting="stch", weighting_hparams={"warmup_epochs": 1}, model=VIT), True),
    "ew-resnet-hps": (dict(weighting="ew", model={**RESNET, "arch": "hps"}), True),      # BatchNorm in the backbone
    "db_mtl-resnet-tesla": (dict(weighting="db_mtl", model={**RESNET, "arch": "tesla"}), False),  # per-task BN
}
CONTROL = "db_mtl-vit-tesla"


def _config(fields: dict) -> TrainConfig:
    return preset("smoke", image_size=56, epochs=EPOCHS, batch_size=GLOBAL_BATCH // WORLD, progress=False,
                  device="cpu", augment=False, **fields)


def _share(batch: dict, rank: int, world: int) -> dict:
    n = len(batch["label"]) // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def _revert_to_local_statistics(model: nn.Module) -> None:
    """The negative control: BatchNorm on this rank's share only (as before data parallel was exact)."""
    for module in model.modules():
        if type(module) is GlobalBatchNorm2d:
            module.__class__ = nn.BatchNorm2d
        elif type(module) is GlobalGroupBatchNorm2d:
            module.__class__ = GroupBatchNorm2d


def _train(config: dict, batches: list[dict], rank: int, world: int, exact: bool = True) -> dict:
    """The engine's set-up and epochs on this rank's share of every global batch.

    In float64 and with plain SGD in place of the run's Adam (the optimiser is the same elementwise update on every
    rank; what data parallel must get right is the gradient): in float32 the two gradients agree to rounding (about
    1e-7 relative), but Adam turns a rounding difference of a near-zero gradient element into a step of up to lr,
    as any other change of summation order (a different thread count) does, which would hide the comparison."""
    cfg = TrainConfig(**config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        state = engine._build_state(cfg, {}, torch.device("cpu"))
        state["optimizer"] = torch.optim.SGD(state["optimizer"].param_groups[0]["params"], lr=LR)
        if not exact:
            state["weighting"].global_mean = None
            _revert_to_local_statistics(state["raw_model"])
        shares = [_share({**b, "image": b["image"].double()}, rank, world) for b in batches]
        for epoch in range(EPOCHS):
            engine._train_epoch(state, shares, epoch, cfg, rank, world)
    finally:
        torch.set_default_dtype(default)
    return {"model": engine._trainable_state(state["raw_model"]), "ddp": uses_ddp(state["model"]),
            "weighting": state["weighting"].state_dict(),
            "global_bn": sum(isinstance(m, (GlobalBatchNorm2d, GlobalGroupBatchNorm2d))
                             for m in state["raw_model"].modules())}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        spec = torch.load(Path(folder) / "spec.pt", weights_only=True)
        out = {name: _train(config, spec["batches"], rank, world) for name, config in spec["configs"].items()}
        out["control"] = _train(spec["configs"][CONTROL], spec["batches"], rank, world, exact=False)
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a, b) -> float:
    """Largest absolute difference between two nested structures of tensors (exact equality elsewhere)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([_max_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        return max([_max_diff(x, y) for x, y in zip(a, b)] or [0.0])
    if torch.is_tensor(a):
        assert a.shape == b.shape and a.dtype == b.dtype
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    assert a == b
    return 0.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    configs = {name: _config(fields).to_dict() for name, (fields, _) in CASES.items()}
    data = engine.make_datasets(TrainConfig(**configs[CONTROL]), splits=("train",))["train"]
    assert not data.transform.augment
    items = [data[i] for i in range(GLOBAL_BATCH * STEPS)]
    batches = [default_collate(items[i:i + GLOBAL_BATCH]) for i in range(0, len(items), GLOBAL_BATCH)]
    for batch in batches:
        batch.pop("path")
    torch.save({"configs": configs, "batches": batches}, folder / "spec.pt")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(folder)), nprocs=WORLD, join=True)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = {name: _train(config, batches, 0, 1) for name, config in configs.items()}
    return ranks, single


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_process_on_the_global_batch(runs, name):
    ranks, single = runs
    two, one = ranks[0][name], single[name]
    assert two["ddp"] is CASES[name][1] and not one["ddp"]
    assert two["global_bn"] > 0 and one["global_bn"] == 0  # BatchNorm statistics over both ranks' shares
    assert _max_diff(ranks[0][name], ranks[1][name]) == 0.0  # identical on every rank
    diff = max(_max_diff(two["model"], one["model"]), _max_diff(two["weighting"], one["weighting"]))
    print(f"{name}: max |2 processes - 1 process| = {diff:.3g}")
    assert diff < TOL


def test_the_previous_scheme_is_detected(runs):
    ranks, single = runs
    diff = _max_diff(ranks[0]["control"]["model"], single[CONTROL]["model"])
    print(f"previous scheme: max |2 processes - 1 process| = {diff:.3g}")
    assert diff > 100 * TOL
