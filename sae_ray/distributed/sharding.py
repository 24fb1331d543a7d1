"""How a fine-tune's model is spread over the ranks of a trial's Train run.

`ddp` keeps a full replica (weights, gradients, AdamW state) on every rank and averages
gradients: simple and fastest while the model fits one device. `fsdp` shards all three
over the ranks with torch's `fully_shard` (FSDP2: each block, then the root), so a model
whose training state is N times one device's memory trains on N devices; each block's
weights are gathered only while it runs. Both average gradients the same way, so a step is
the same step (up to float reduction order).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sae_ray.distributed.ranks import rank_world

Strategy = Literal["ddp", "fsdp"]


def _world() -> int:
    return rank_world()[1]


def wrap(
    model: nn.Module,
    strategy: Strategy,
    device: torch.device,
    bf16: bool,
    blocks: list[nn.Module],
) -> nn.Module:
    """The module a training step runs: the model itself on one rank, a DDP wrapper, or the
    model sharded in place (`fsdp`: each of its `blocks`, then the root; weights held in
    bf16 with float32 gradient reduction when `bf16`)."""
    if _world() == 1 or strategy == "ddp":
        model.to(device)
    if _world() == 1:
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (_world(),))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
    )
    for block in blocks:  # one block at a time: never the whole model on the device
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of this rank's weights (its shards, when sharded): the best epoch so far."""
    out = {}
    for name, value in model.state_dict().items():
        local = value.to_local() if hasattr(value, "to_local") else value
        out[name] = local.detach().to("cpu", copy=True)
    return out


def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in model.state_dict().items():
            local = value.to_local() if hasattr(value, "to_local") else value
            local.copy_(saved[name])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, gathered from every rank's shards (collective:
    every rank calls it; rank 0 receives them, the others an empty dict)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def original_class(model: nn.Module) -> type:
    """The model's own class (`fully_shard` swaps in a subclass named FSDP<name>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
