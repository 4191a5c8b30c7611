"""Connectors between the backbone's tokens and the task heads.

* :class:`CMoEConnector` -- Uni-Med's **Connector Mixture-of-Experts** (Zhu et al., "Uni-Med: A Unified Medical
  Generalist Foundation Model For Multi-Task Learning Via Connector-MoE", NeurIPS 2024, arXiv:2409.17508), which
  attacks the multi-task "tug-of-war" at the connector instead of inside the backbone. Only its transferable core is
  built (no LLM): E experts, each a 2-layer MLP ``D -> hidden -> D`` with GELU; a router MLP
  (``Linear(2D -> router_hidden) -> GELU -> Linear(-> E)``) reads ``[task token ; visual token]`` for every token,
  with one learned task token per task (``N(0, 0.02)`` init). Router types:

  - ``soft``: ``sigmoid(logits)`` normalised to sum 1 (Uni-Med's choice; **not** a softmax);
  - ``sparse``: softmax over the top-k logits (k = 2), zeros elsewhere;
  - ``hard``: task t always uses expert t (needs E >= number of tasks; experts beyond are unused);
  - ``constant``: 1/E for every expert (the plain mean of the experts).

  Output per token ``sum_e w_e E_e(x)`` (no residual, as Uni-Med's projection). Every image passes the connector
  once per task (the routing depends on the task token); with a shared feature map (HPS) the experts run once and
  only the mixing is per task. The **2-D token grid is kept** (no 1x4 token merging as Uni-Med does for its LLM),
  so the segmentation head still gets a ``(B, D, h, w)`` map; a ViT class token of the same width is routed as one
  more token. Uni-Med has no load-balancing loss, and none is added: ``last_routing`` holds, after every forward,
  each task's mean routing weight per expert and mean routing entropy (the engine logs them per epoch).

  Where Uni-Med's paper leaves a detail open (router hidden width, where the task token comes from), the choices above
  are this project's, taken from the public description; they are documented as such.

* :func:`released_token_map` -- **the released EndoARSS code's bug**, kept to measure it: its encoder tokens
  ``(B, N, C)`` were reshaped for the heads with ``.view(B, 256, 16, 48)``, i.e. the N = 256 patch tokens became
  *channels* and the C = 768 feature dimensions became a 16 x 48 "image". :func:`spatial_token_map` is the proper
  ``(B, C, h, w)`` map (what this project's backbones return).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CMoEConnector", "CMOE_ROUTERS", "released_grid", "released_token_map", "spatial_token_map",
           "tokens_from_map", "token_position_probe", "routing_entropy", "routing_divergence"]

CMOE_ROUTERS = ("soft", "sparse", "hard", "constant")


# ---------------------------------------------------------------------------------------------------------------
# Token maps: the proper spatial layout and the released code's reshape
# ---------------------------------------------------------------------------------------------------------------

def tokens_from_map(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) spatial map -> (B, h*w, C) tokens in raster order (the ViT's patch order)."""
    if fmap.ndim != 4:
        raise ValueError(f"expected a (B, C, h, w) map, got shape {tuple(fmap.shape)}")
    return fmap.flatten(2).transpose(1, 2)


def spatial_token_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, N = h*w, C) patch tokens -> the spatial map (B, C, h, w): channel = feature, pixel = patch position."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {h} x {w} grid")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def released_grid(channels: int) -> tuple[int, int]:
    """The "image" the released reshape makes of C feature dimensions: (16, 48) for C = 768 (the released code's
    literal), else the most square factorisation ``gh x gw = C`` with ``gh <= gw``."""
    if channels == 768:
        return 16, 48
    gh = max(d for d in range(1, int(math.isqrt(channels)) + 1) if channels % d == 0)
    return gh, channels // gh


def released_token_map(tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """**The released code's bug, reproduced**: ``tokens.view(B, N, gh, gw)`` with ``gh * gw = C``.

    (B, N, C) patch tokens become N *channels* over a gh x gw grid of *feature dimensions*: pixel (i, j) of the result
    holds feature ``i * gw + j`` of every token, so no pixel corresponds to an image position. With the released
    ViT-B/14 at 224 px this is ``view(B, 256, 16, 48)``. Use only to measure the bug (notebook 11).
    """
    b, n, c = tokens.shape
    gh, gw = grid if grid is not None else released_grid(c)
    if gh * gw != c:
        raise ValueError(f"grid {gh} x {gw} does not hold {c} feature dimensions")
    return tokens.reshape(b, n, gh, gw)


@torch.no_grad()
def token_position_probe(backbone: nn.Module, image: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Where does a change of one image patch land in the feature map the heads read?

    Every patch of ``image`` (3, H, W) is replaced in turn by Gaussian noise (one batched forward of the P perturbed
    copies through ``backbone``, a ViT backbone of this library); the change of the (B, C, h, w) map is measured
    per map pixel (squared norm over channels) for the proper spatial map and for the released reshape
    (:func:`released_token_map`, whose "pixels" are feature dimensions). Returns, per layout, ``energy`` (P, h', w'),
    ``share`` (P,): the fraction of the change at the perturbed patch's own position (chance: 1 / (h' w')), and
    ``hit`` (P,): whether the largest change is there; plus ``released_channel_share`` (P,): the share of the
    released map's change in channel p (the perturbed token becomes a channel).
    """
    stride = backbone.stride
    _, hh, ww = image.shape
    h, w = hh // stride, ww // stride
    g = torch.Generator().manual_seed(seed)
    batch = image[None].repeat(h * w, 1, 1, 1)
    for p in range(h * w):
        i, j = divmod(p, w)
        batch[p, :, i * stride:(i + 1) * stride, j * stride:(j + 1) * stride] = torch.randn(
            3, stride, stride, generator=g).to(image)
    base = backbone(image[None]).maps[0]  # (1, C, h, w)
    delta = backbone(batch).maps[0] - base  # (P, C, h, w)
    out: dict[str, torch.Tensor] = {}
    index = torch.arange(h * w)
    for name, fmap in (("spatial", delta), ("released", released_token_map(tokens_from_map(delta)))):
        energy = fmap.pow(2).sum(1)  # (P, h', w')
        flat = energy.flatten(1)
        total = flat.sum(1).clamp_min(1e-30)
        if flat.shape[1] == h * w:  # the position p exists on this map (always for spatial; released when square)
            share, hit = flat[index, index] / total, flat.argmax(1) == index
        else:
            share, hit = torch.full((h * w,), float("nan")), torch.zeros(h * w, dtype=torch.bool)
        out[name] = {"energy": energy, "share": share, "hit": hit}
    released = released_token_map(tokens_from_map(delta))
    channel = released.pow(2).sum((2, 3))  # (P, N)
    out["released_channel_share"] = channel[index, index] / channel.sum(1).clamp_min(1e-30)
    out["grid"] = torch.tensor([h, w])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Routing statistics
# ---------------------------------------------------------------------------------------------------------------

def routing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of routing distributions over the last axis (0 log 0 = 0)."""
    return -torch.special.xlogy(weights, weights).sum(-1)


def routing_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (nats) between two routing distributions over E experts (e.g. two tasks' mean
    routing weights): 0 = the tasks use the experts alike, log 2 = disjoint experts."""
    p = p.double() / p.double().sum()
    q = q.double() / q.double().sum()
    m = 0.5 * (p + q)
    kl = lambda a, b: float(torch.special.xlogy(a, a).sum() - torch.special.xlogy(a, b).sum())  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


# ---------------------------------------------------------------------------------------------------------------
# CMoE
# ---------------------------------------------------------------------------------------------------------------

class _Expert(nn.Module):
    """One projection expert: Linear(D -> hidden) -> GELU -> Linear(hidden -> D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CMoEConnector(nn.Module):
    """Connector mixture-of-experts over the tokens of each task's feature map (see the module docstring).

    Args:
        dim: token width D (the backbone's feature channels).
        tasks: task names, in order (task t owns task token t; under ``hard`` routing, expert t).
        num_experts: E (Uni-Med: 5).
        router: ``"soft"`` | ``"sparse"`` | ``"hard"`` | ``"constant"``.
        hidden: experts' hidden width (None -> D).
        router_hidden: router's hidden width (None -> D).
        top_k: experts kept by the ``sparse`` router (2).

    ``forward(feats)`` maps ``{task: (fmap (B, D, h, w), class token (B, D) | None)}`` to the same structure. Only
    ``soft`` and ``sparse`` have a router and task tokens; ``constant`` and ``hard`` need none.
    """

    def __init__(self, dim: int, tasks: Sequence[str], num_experts: int = 5, router: str = "soft",
                 hidden: int | None = None, router_hidden: int | None = None, top_k: int = 2):
        super().__init__()
        tasks = tuple(tasks)
        if router not in CMOE_ROUTERS:
            raise ValueError(f"cmoe_router must be one of {CMOE_ROUTERS}, got {router!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"cmoe_experts must be an int >= 1, got {num_experts!r}")
        if router == "hard" and num_experts < len(tasks):
            raise ValueError(f"cmoe_router='hard' routes task t to expert t: needs cmoe_experts >= {len(tasks)} "
                             f"tasks, got {num_experts}")
        if router == "sparse" and not 1 <= top_k <= num_experts:
            raise ValueError(f"cmoe_top_k={top_k} must be in [1, cmoe_experts={num_experts}]")
        self.dim, self.tasks, self.num_experts, self.router_type, self.top_k = dim, tasks, num_experts, router, top_k
        hidden = hidden or dim
        self.experts = nn.ModuleList([_Expert(dim, hidden) for _ in range(num_experts)])
        if router in ("soft", "sparse"):
            rh = router_hidden or dim
            self.task_tokens = nn.ParameterDict({t: nn.Parameter(torch.randn(dim) * 0.02) for t in tasks})
            self.router = nn.Sequential(nn.Linear(2 * dim, rh), nn.GELU(), nn.Linear(rh, num_experts))
        self.last_routing: dict[str, dict[str, torch.Tensor]] = {}
        self.reset_epoch_stats()

    # -- per-epoch routing statistics (the engine's hook: reset_epoch_stats / epoch_stats) --------------------------
    def reset_epoch_stats(self) -> None:
        """Forget the routing statistics accumulated over training forwards."""
        self._epoch: dict[str, list] = {}  # task -> [sum of batch-mean weights x images, sum of entropies x images, n]

    def _accumulate(self, images: int) -> None:
        for t, r in self.last_routing.items():
            acc = self._epoch.setdefault(t, [torch.zeros(r["weights"].numel(), dtype=torch.float64), 0.0, 0])
            acc[0] += r["weights"].detach().cpu().double() * images
            acc[1] += float(r["entropy"]) * images
            acc[2] += images

    def epoch_stats(self, tasks) -> tuple[dict[str, float], list[dict]]:
        """Log columns (``routing_entropy_<task>``, ``routing_js``) and ``routing.csv`` rows (``task``, ``entropy``,
        ``expert<e>``) of the training forwards since :meth:`reset_epoch_stats`, weighted by images."""
        if not self._epoch:
            return {}, []
        means = {t: acc[0] / acc[2] for t, acc in self._epoch.items()}
        columns, rows = {}, []
        for t, acc in self._epoch.items():
            rows.append({"task": t, "entropy": acc[1] / acc[2],
                         **{f"expert{e}": float(w) for e, w in enumerate(means[t])}})
            columns[f"routing_entropy_{t}"] = acc[1] / acc[2]
        present = [t for t in tasks if t in means]
        if len(present) >= 2:
            columns["routing_js"] = routing_divergence(means[present[0]], means[present[1]])
        return columns, rows

    def extra_repr(self) -> str:
        return f"dim={self.dim}, tasks={self.tasks}, experts={self.num_experts}, router={self.router_type!r}"

    # -- ownership (for the multi-task parameter sets) -----------------------------------------------------------
    def owner(self, name: str) -> str | None:
        """Task that owns a connector parameter (name relative to the connector), or None when shared: a task token
        belongs to its task; under ``hard`` routing expert t belongs to task t."""
        parts = name.split(".")
        if parts[0] == "task_tokens":
            return parts[1]
        if self.router_type == "hard" and parts[0] == "experts" and int(parts[1]) < len(self.tasks):
            return self.tasks[int(parts[1])]
        return None

    # -- routing -------------------------------------------------------------------------------------------------
    def routing_weights(self, task: str, x: torch.Tensor) -> torch.Tensor:
        """Routing weights (..., N, E) of task ``task`` for tokens x (..., N, D); every token's weights sum to 1."""
        e = self.num_experts
        if self.router_type == "constant":
            return x.new_full((*x.shape[:-1], e), 1.0 / e)
        if self.router_type == "hard":
            w = x.new_zeros((*x.shape[:-1], e))
            w[..., self.tasks.index(task)] = 1.0
            return w
        tok = self.task_tokens[task].to(x.dtype).expand(*x.shape[:-1], self.dim)
        logits = self.router(torch.cat([tok, x], dim=-1))
        if self.router_type == "soft":
            s = torch.sigmoid(logits)
            return s / s.sum(-1, keepdim=True)
        vals, idx = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, F.softmax(vals, dim=-1))

    def _expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N, D) -> (..., N, E, D): every expert on every token."""
        return torch.stack([expert(x) for expert in self.experts], dim=-2)

    def route(self, task: str, x: torch.Tensor, expert_outputs: torch.Tensor | None = None) -> torch.Tensor:
        """Task ``task``'s connector output for tokens x (B, N, D); records its routing statistics."""
        if self.router_type == "hard":
            out = self.experts[self.tasks.index(task)](x)  # the other experts are not even run
            w = None
        else:
            ys = self._expert_outputs(x) if expert_outputs is None else expert_outputs
            if self.router_type == "constant":
                out, w = ys.mean(dim=-2), None
            else:
                w = self.routing_weights(task, x)
                out = torch.einsum("bne,bned->bnd", w, ys)
        with torch.no_grad():
            if w is None:
                w = self.routing_weights(task, x[..., :1, :])  # constant over tokens: one token is enough
            flat = w.detach().reshape(-1, self.num_experts).float()
            self.last_routing[task] = {"weights": flat.mean(0), "entropy": routing_entropy(flat).mean(),
                                       "tokens": torch.tensor(x.shape[0] * x.shape[1])}
        return out

    def forward(self, feats: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per task: tokens of its map (and its class token) through the connector, back on the same grid."""
        self.last_routing = {}
        shared_inputs: dict[int, torch.Tensor] = {}  # id(fmap) -> expert outputs, computed once per distinct map
        out = {}
        for task, (fmap, tok) in feats.items():
            if task not in self.tasks:
                raise ValueError(f"unknown task {task!r}; connector tasks: {self.tasks}")
            b, c, h, w = fmap.shape
            if c != self.dim:
                raise ValueError(f"feature map has {c} channels, connector built with dim={self.dim}")
            x = tokens_from_map(fmap)
            route_tok = tok is not None and tok.shape[-1] == self.dim
            if route_tok:
                x = torch.cat([tok[:, None], x], dim=1)
            key = id(fmap)
            ys = None
            if self.router_type != "hard" and sum(f is fmap for f, _ in feats.values()) > 1:
                if key not in shared_inputs:
                    shared_inputs[key] = self._expert_outputs(x)
                ys = shared_inputs[key]
            y = self.route(task, x, ys)
            new_tok = y[:, 0] if route_tok else tok
            patches = y[:, 1:] if route_tok else y
            out[task] = (spatial_token_map(patches, h, w), new_tok)
        if self.training:
            self._accumulate(next(iter(feats.values()))[0].shape[0])
        return out

    def routing_summary(self) -> dict[str, dict[str, float | list[float]]]:
        """``{task: {"weights": [E floats], "entropy": float}}`` of the last forward."""
        return {t: {"weights": r["weights"].tolist(), "entropy": float(r["entropy"])}
                for t, r in self.last_routing.items()}
