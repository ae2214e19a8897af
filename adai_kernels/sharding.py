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


def first_position(param: torch.Tensor, where: str) -> int:
    """The position, in the full parameter's memory order, of the first element of this
    process's shard (0 for a tensor that is not a DTensor), for the stochastic rounding index
    (docs/design.md, "Stochastic rounding"). The shard's elements must follow one another in
    the full parameter: a row-major full parameter and a row-major shard that is a run of
    whole rows of its trailing dimensions (dim-0 sharding, as fully_shard does); anything
    else is refused with a RuntimeError naming `where`, as the index would not be the
    unsharded run's."""
    if not is_dtensor(param):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(param.shape)
    local_shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements)
    shard = param.to_local()
    row_major = torch.empty(shape, device="meta").stride()
    if shard.numel() == 0:
        return 0
    span = _is_run_of_rows(shape, tuple(local_shape), tuple(offset))
    if not (span and tuple(param.stride()) == row_major and shard.is_contiguous()):
        raise RuntimeError(
            f"stochastic_rounding: {where} is a DTensor sharded as {param.placements} (local "
            f"shape {tuple(local_shape)} at offset {tuple(offset)} of {shape}, strides "
            f"{tuple(param.stride())}); its shard must be one contiguous run of the full "
            f"row-major parameter, as dim-0 sharding (fully_shard) makes it")
    return sum(o * s for o, s in zip(offset, row_major))


def _is_run_of_rows(shape: tuple, local_shape: tuple, offset: tuple) -> bool:
    """Whether the box `local_shape` at `offset` of `shape` is one contiguous run in
    row-major order: size 1 in the dims before some dim k, whole in the dims after it."""
    partial = [d for d, (n, ln, o) in enumerate(zip(shape, local_shape, offset))
               if ln != n or o != 0]
    if not partial:
        return True
    k = partial[-1]
    return all(ln == 1 for ln in local_shape[:k])
