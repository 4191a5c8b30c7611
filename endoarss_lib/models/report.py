"""Parameter report per component and GFLOPs per image (``torch.utils.flop_counter.FlopCounterMode``).

FLOP convention: FlopCounterMode counts a multiply-accumulate as 2 FLOPs (matmul, conv, attention matmuls), and
ignores element-wise ops (norms, softmax, activations). During counting timm's fused attention is switched to its
explicit ``q @ k^T`` / ``attn @ v`` path, because the CPU fused kernel is not counted.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .lora import override_attribute

__all__ = ["component_of", "parameter_report", "count_gflops", "COMPONENTS"]

COMPONENTS = ("backbone", "sma", "lora", "tesla", "experts", "gates", "connector")


def component_of(name: str) -> str:
    """Component of a parameter name: backbone, sma, lora, tesla, experts, gates, connector or head.<task>."""
    if name.startswith("connector."):
        return "connector"
    if name.startswith("heads."):
        return "head." + name.split(".")[1]
    if name.startswith("gates."):
        return "gates"
    if name.startswith("backbone.sma."):
        return "sma"
    if name.endswith((".lora_A", ".lora_B")):
        return "lora"
    if ".tesla_" in name:
        return "tesla"
    if ".expert_" in name or name.startswith("backbone.experts."):
        return "experts"
    return "backbone"


def parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{component: {"total": n, "trainable": n}}`` (components present only) plus a ``"total"`` row."""
    rows: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        r = rows.setdefault(component_of(name), {"total": 0, "trainable": 0})
        r["total"] += p.numel()
        r["trainable"] += p.numel() if p.requires_grad else 0
    order = list(COMPONENTS) + sorted(k for k in rows if k not in COMPONENTS)
    out = {k: rows[k] for k in order if k in rows}
    out["total"] = {"total": sum(r["total"] for r in rows.values()),
                    "trainable": sum(r["trainable"] for r in rows.values())}
    return out


def count_gflops(model: nn.Module, image_size: int | None = None, by_component: bool = False):
    """GFLOPs (2 x MACs) of one forward of one image; ``by_component`` -> dict total/sma/backbone/gates/heads
    (and connector, when the model has one)."""
    if image_size is None:
        image_size = model.config.image_size
    p = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), override_attribute(model, "fused_attn", False), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    total = fc.get_total_flops() / 1e9
    if not by_component:
        return total
    counts = fc.get_flop_counts()
    root = type(model).__name__

    def g(path: str) -> float:
        return sum(counts.get(f"{root}.{path}", {}).values()) / 1e9

    sma, gates = g("backbone.sma"), g("gates")
    heads = {f"head.{t}": g(f"heads.{t}") for t in getattr(model, "tasks", ())}
    out = {"total": total, "sma": sma, "backbone": g("backbone") - sma, "gates": gates}
    if getattr(model, "connector", None) is not None:
        out["connector"] = g("connector")
    out.update(heads)
    return out


def parameter_sentence(report: dict[str, dict[str, int]]) -> str:
    """What a :func:`parameter_report` says, in words computed from it: the share of the parameters that trains and
    the share the frozen backbone holds (no adjective the numbers do not support)."""
    total = report["total"]["total"]
    trainable = report["total"]["trainable"]
    frozen = sum(r["total"] - r["trainable"] for k, r in report.items() if k != "total")
    parts = [f"{trainable:,} of {total:,} parameters train ({trainable / total:.1%})",
             f"{frozen:,} are frozen ({frozen / total:.1%})"]
    biggest = max(((k, r["trainable"]) for k, r in report.items() if k != "total"), key=lambda kv: kv[1])
    if trainable:
        parts.append(f"the largest trainable part is {biggest[0]} ({biggest[1] / trainable:.1%} of what trains)")
    return "; ".join(parts) + "."
