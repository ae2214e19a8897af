"""Sharded parameters (FSDP2's DTensors): the kernels step each process's local shard; the
global statistics are summed over the parameters' device mesh; checkpoints hold DTensors."""
from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The process-local tensor (the shard of a DTensor, which shares its storage)."""
    return t.to_local() if is_dtensor(t) else t


def reduce_group(params: list[torch.Tensor]):
    """The process group over which a step's statistics must be summed for DTensor
    parameters, or None when there are none. Only dim-0-style sharding on a 1-D mesh is
    supported: replicated DTensors (or 2-D meshes) would be counted more than once."""
    meshes = {p.device_mesh: p for p in params if is_dtensor(p)}  # equal meshes hash alike
    if not meshes:
        return None
    if len(meshes) > 1:
        raise RuntimeError("Adai: DTensor parameters on different device meshes; pass "
                           "process_group= to name the group to reduce over")
    p = next(iter(meshes.values()))
    if p.device_mesh.ndim != 1 or not all(pl.is_shard() for pl in p.placements):
        raise RuntimeError(f"Adai: DTensor parameters must be sharded on a 1-D mesh (as "
                           f"fully_shard does), got placements {p.placements} on "
                           f"{p.device_mesh}; pass process_group= for other layouts")
    return p.device_mesh.get_group()


def like_param(state: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A local state tensor as the checkpoint shows it: a DTensor laid out like its
    DTensor parameter, else unchanged."""
    if not is_dtensor(param):
        return state
    return DTensor.from_local(state, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())
