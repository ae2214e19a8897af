"""Master weights and stochastic rounding of FSDP2 (fully_shard) parameters, on CPU with gloo,
2 processes: the sharded run equals an unsharded one bitwise, since each shard is rounded
at the indices of its elements in the full parameter (docs/design.md, "Stochastic
rounding"). A shard that is not one run of its parameter is refused."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adai_kernels import Adai
from adai_kernels.backends.base import MASTER_WEIGHTS, STOCHASTIC_ROUNDING
from precision_cases import feature_backends
from test_distributed import WORLD, _free_port, _release_group

BACKENDS = [b for b in feature_backends(STOCHASTIC_ROUNDING)
            if b in feature_backends(MASTER_WEIGHTS) and b != "triton"]  # too slow for 2
STEPS = 3


def _model():
    torch.manual_seed(0)
    # 16 rows: shards of 8; 3 rows: 2 and 1 (uneven); 1 row: 1 and none (an empty shard)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3), torch.nn.Linear(3, 1)).bfloat16()


def _shard(full: torch.Tensor, like, rank: int):
    """This rank's dim-0 chunk of `full` (torch.chunk's split, as fully_shard makes it) as a
    DTensor laid out like the parameter `like`."""
    from torch.distributed.tensor import DTensor

    chunks = full.chunk(WORLD)
    local = chunks[rank] if rank < len(chunks) else full[:0]
    assert local.shape == like.to_local().shape
    return DTensor.from_local(local.contiguous(), like.device_mesh, like.placements,
                              shape=like.shape, stride=like.stride())


def _sharded_matches_unsharded(rank, backend, options):
    """The same gradients (drawn whole on every rank) to a fully_shard model and to a plain
    copy: parameters and (with master weights) masters equal bitwise."""
    from torch.distributed.fsdp import fully_shard

    model, single = _model(), _model()
    for layer in (model[0], model[2], model[3]):
        fully_shard(layer)
    fully_shard(model)
    hyper = dict(lr=0.05, weight_decay=1e-3, backend=backend, max_grad_norm=1.0, **options)
    opt, opt_single = Adai(model.parameters(), **hyper), Adai(single.parameters(), **hyper)
    gen = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        for p, q in zip(model.parameters(), single.parameters()):
            q.grad = torch.randn(q.shape, generator=gen).bfloat16()
            p.grad = _shard(q.grad, p, rank)
        opt.step()
        opt_single.step()
    for p, q in zip(model.parameters(), single.parameters()):
        assert torch.equal(p.full_tensor(), q), options
    if options.get("master_weights"):
        state, state_single = opt.state_dict()["state"], opt_single.state_dict()["state"]
        for i, entry in state_single.items():
            assert torch.equal(state[i]["master_param"].full_tensor(), entry["master_param"])


def _column_shards_are_refused(rank, backend):
    """Shard(1): each rank holds columns, which are not one run of the row-major parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    full = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).bfloat16()
    p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(1)]))
    p.grad = distribute_tensor(torch.ones_like(full), mesh, [Shard(1)])
    opt = Adai([p], lr=0.1, backend=backend, stochastic_rounding=True)
    try:
        opt.step()
    except RuntimeError as e:
        assert "parameter 0 (param group 0) is a DTensor sharded as (Shard(dim=1),)" in str(e)
        assert "one contiguous run" in str(e)
    else:
        raise AssertionError("a column shard was rounded")
    assert not opt.state and not opt._buckets
    plain = Adai([p], lr=0.1, backend=backend)  # rounded to nearest: any layout steps
    plain.step()


def _worker(rank, port, backend, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        _sharded_matches_unsharded(rank, backend, dict(stochastic_rounding=True, seed=9))
        _sharded_matches_unsharded(rank, backend, dict(master_weights=True))
        _column_shards_are_refused(rank, backend)
    except Exception as e:  # reported to the parent, which fails the test
        with open(os.path.join(errors, f"rank{rank}"), "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()
        _release_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_matches_single_process_bitwise(backend):
    with tempfile.TemporaryDirectory() as errors:
        try:
            mp.spawn(_worker, args=(_free_port(), backend, errors), nprocs=WORLD, join=True)
        except Exception:
            msgs = [open(os.path.join(errors, f)).read() for f in sorted(os.listdir(errors))]
            pytest.fail("; ".join(msgs) or "a worker failed")
