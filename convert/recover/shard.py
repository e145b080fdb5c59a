"""Sharding a run over its processes with torch's FSDP2 (``shard=true``): the student's and the teacher's weights, the
gradients and AdamW's state are split over the processes instead of replicated in each (DDP, the default).

Every decoder layer is its own ``fully_shard`` unit (its weights gathered for its forward and backward, then freed),
the rest (embeddings, head, final norm) the root's. What must be whole is gathered here, on every process together:
the trained tensors and the optimizer state for a checkpoint and the export, the global gradient norm for clipping.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)  # main process gets it
LOAD = StateDictOptions(full_state_dict=True, strict=False)  # every process passes the whole state


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """Each decoder layer of ``model`` (the ``ModuleList`` named ``layers``), then the root, sharded over every
    process; the shards land on ``device``. A model on the host goes there one unit at a time (``fully_shard`` moves
    a unit's tensors, then keeps this process's shard): the device never holds more than one layer whole."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            for layer in module:
                fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def trained_state(model) -> dict[str, torch.Tensor]:
    """The trained tensors, whole, on the CPU of the main process (empty elsewhere); every process must call it.
    (A frozen tensor tied to another name, the output head, comes along: it is dropped.)"""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(model, options=FULL).items() if k in trained}


def optimizer_state(model, optimizer) -> dict:
    """AdamW's state keyed by parameter names, whole, on the main process; every process must call it."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_state(model, optimizer, trained: dict[str, torch.Tensor], optim: dict) -> None:
    """A checkpoint's trained tensors and optimizer state (as ``trained_state`` / ``optimizer_state`` wrote them)
    into the sharded ``model`` and ``optimizer``; every process passes the whole of both."""
    set_model_state_dict(model, trained, options=LOAD)
    set_optimizer_state_dict(model, optimizer, optim, options=LOAD)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The global norm of the sharded gradients (the shards are disjoint: their squares add up over processes),
    clipped to ``max_norm`` when it is > 0; every process must call it."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = local[0].device if local else torch.device("cpu")
    square = torch.zeros((), device=device, dtype=torch.float32)
    for g in local:
        square += g.float().pow(2).sum()
    dist.all_reduce(square)
    norm = math.sqrt(float(square))
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        for g in local:
            g.mul_(max_norm / (norm + 1e-6))
    return norm
