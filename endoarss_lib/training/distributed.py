"""Data-parallel training that equals one process on the global batch (``torchrun --nproc_per_node N``).

Each rank computes its share of the global batch. Averaging each rank's *combined* gradient, as a plain all-reduce
does, is not the global batch's step for a multi-task weighting: DB-MTL's rescaling, Aligned-MTL's and MoCo's
combinations and STCH's smooth maximum are not linear in the batch. :func:`prepare_data_parallel` (called by the
engine when it builds a run under ``torchrun``) makes the step the one a single process takes on the global batch:

* **gradient weightings** (DB-MTL, Aligned-MTL, MoCo): every rank's per-task gradients of the trainable shared
  parameters (the T x P matrix, small: LoRA, SMA, adapters) and its task losses are all-gathered and averaged in rank
  order (:func:`global_mean`: every rank gets the same bits), so the method combines the **global** matrix once,
  identically on every rank (its EMA / step state stays in step); the task-specific parameters get the method's head
  weights of the global losses times their local gradients, which the engine then averages over the ranks
  (:func:`average_gradients`). The hand-off is ``Weighting.global_mean`` (see
  :class:`~endoarss_lib.weighting.base.GradWeighting`).
* **loss-level weightings** (EW, STCH): the weights ``d loss / d L_t`` are computed from the global losses (STCH's
  nadir too), each rank backpropagates ``sum_t w_t L_t`` of its share, and
  :class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients while the backward runs. (A model with a
  separately backpropagated regulariser, DSelect-k, is not wrapped: DDP allows one backward per forward; its
  gradients are averaged after the backward instead. The result is the same.)
* **BatchNorm** (the heads' and a trainable ResNet's): statistics of the global batch. Every BatchNorm2d in training
  mode becomes a :class:`GlobalBatchNorm2d` (GroupBatchNorm2d: :class:`GlobalGroupBatchNorm2d`, per task group as
  before): per-channel sums are all-reduced with a differentiable all-reduce, so the backward is the global batch's
  too. It works with any backend (gloo on CPU included, where ``torch.nn.SyncBatchNorm`` refuses to run) and keeps
  the task groups of TESLA's ResNet, which ``convert_sync_batchnorm`` would merge.

Equal up to floating-point rounding (the test, ``tests/test_distributed.py``: 2 gloo processes vs 1, within 1e-6)
under these conditions: every rank holds the same number of samples (``DistributedSampler`` pads the dataset so that
it does) and a task loss is a mean over samples. A loss averaged over *valid pixels* (segmentation with ignored
pixels) is averaged per rank, so ranks whose shares have different numbers of valid pixels are weighted equally,
not by their pixel counts; dropout draws differ from a single process's; GM-Coord's progress scores stay per rank
(its coefficients are not the global batch's: a warning says so). The per-task backward must be the loop
(``task_grads`` mode ``auto`` / ``loop``): a batched (vmapped) backward cannot run the BatchNorm all-reduce.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..models.architectures import MultiTaskModel
from ..models.backbones import GroupBatchNorm2d
from ..weighting.base import GradWeighting, LossWeighting

__all__ = ["global_mean", "average_gradients", "GlobalBatchNorm2d", "GlobalGroupBatchNorm2d", "convert_batchnorm",
           "prepare_data_parallel", "uses_ddp", "unwrap", "world_size"]


def world_size() -> int:
    """Number of processes of the initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over the ranks: all-gathered, then summed in rank order, so every rank gets the same
    bits (a detached tensor; the identity in a single process)."""
    world = world_size()
    if world == 1:
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.stack(parts).sum(0) / world


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over the ranks, in one flat all-reduce per dtype and device. Every rank
    must hold gradients for the same parameters (the same model and code path guarantee it)."""
    world = world_size()
    groups: dict[tuple, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


# ------------------------------------------------------------------------------------------------ BatchNorm

class _SumOverRanks(torch.autograd.Function):
    """A differentiable all-reduce (sum): the backward sums the upstream gradients of every rank, so each rank's
    input gets the gradient of the sum of all ranks' losses through it."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _global_batch_norm(bn: nn.BatchNorm2d, x: Tensor, weight: Tensor | None, bias: Tensor | None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise (N, C, H, W) ``x`` with the mean and biased variance of every rank's ``x`` (differentiable
    all-reduces of per-channel sums: two passes, as stable as a local BatchNorm). Returns (y, mean, unbiased var)."""
    all_reduce = _SumOverRanks.apply
    count = torch.full((1,), float(x.numel() // x.shape[1]), device=x.device, dtype=torch.float64)
    dist.all_reduce(count)  # values per channel over all ranks (kept on the device: no host synchronisation)
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 activations (autocast): statistics in float32
    total, xf, shape = count.to(dtype), x.to(dtype), (1, -1, 1, 1)
    mean = all_reduce(xf.sum((0, 2, 3))) / total
    centred = xf - mean.view(shape)
    var = all_reduce((centred * centred).sum((0, 2, 3))) / total
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y.to(x.dtype), mean.detach(), var.detach() * (total / (total - 1))


def _update_running(bn: nn.BatchNorm2d, mean: Tensor, var_unbiased: Tensor) -> None:
    """BatchNorm's running statistics update (momentum, or the cumulative average when it is None)."""
    with torch.no_grad():
        bn.num_batches_tracked += 1
        m = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_(var_unbiased.to(bn.running_var.dtype), alpha=m)


def _syncs(bn: nn.BatchNorm2d) -> bool:
    """Batch statistics are used (training, or no running statistics) and there are other ranks."""
    return (bn.training or not bn.track_running_stats) and world_size() > 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks (any backend); a plain
    BatchNorm2d in a single process and in evaluation. Same parameters, buffers and names as BatchNorm2d."""

    def forward(self, x: Tensor) -> Tensor:
        if not _syncs(self):
            return super().forward(x)
        y, mean, var = _global_batch_norm(self, x, self.weight, self.bias)
        if self.training and self.track_running_stats:
            _update_running(self, mean, var)
        return y


class GlobalGroupBatchNorm2d(GroupBatchNorm2d):
    """GroupBatchNorm2d (per task group statistics, TESLA's ResNet) over the global batch of all ranks."""

    def _normalise_groups(self, xg: Tensor, weight: Tensor | None, bias: Tensor | None, ids: list[int]) -> Tensor:
        if not _syncs(self):
            return super()._normalise_groups(xg, weight, bias, ids)
        y, mean, var = _global_batch_norm(self, xg, weight, bias)
        if self.training and self.track_running_stats:
            self._update_groups(mean.view(len(ids), -1), var.view(len(ids), -1), ids)
        return y


def convert_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm2d of ``model`` use global-batch statistics under data parallel (in place: the same
    parameters and buffers, so optimisers and checkpoints are unaffected). Returns how many were converted."""
    converted = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
        elif type(module) is GroupBatchNorm2d:
            module.__class__ = GlobalGroupBatchNorm2d
        else:
            continue
        converted += 1
    return converted


# ------------------------------------------------------------------------------------------------ the run's model

def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def uses_ddp(model: nn.Module) -> bool:
    """Whether ``model`` (possibly compiled) is DistributedDataParallel, which averages the gradients itself."""
    return isinstance(getattr(model, "_orig_mod", model), DistributedDataParallel)


def _separate_regulariser(model: nn.Module) -> bool:
    """The model backpropagates a regulariser on its own (DSelect-k): a second backward per forward."""
    return type(model).regularization_loss is not MultiTaskModel.regularization_loss


def prepare_data_parallel(model: nn.Module, weighting, device: torch.device) -> nn.Module:
    """Under an initialised process group of more than one rank: global-batch BatchNorm, the weighting's
    global-batch hand-off, and DDP for loss-level weightings (see the module docstring). Returns the model to train
    (``model`` itself, or its DDP wrapper); a no-op in a single process."""
    if world_size() == 1:
        return model
    convert_batchnorm(model)
    weighting.global_mean = global_mean
    if not isinstance(weighting, (GradWeighting, LossWeighting)):
        warnings.warn(f"{weighting.name} under data parallel: each rank weights with its own batch share's "
                      f"statistics and the gradients are averaged; this is not the global batch's step", stacklevel=2)
    if isinstance(weighting, LossWeighting) and not _separate_regulariser(model):
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)
    return model
