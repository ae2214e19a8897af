"""Distributed training on CPU with gloo, 2 processes on 127.0.0.1: the global statistics are
over the whole model, whichever process holds which parameters."""
import gc
import os
import socket
import tempfile
import weakref

import pytest
import torch
import torch.distributed as dist
# Before any process group exists: its functions bind `group=group.WORLD` as a default at
# import; imported later (the first optimizer does, through torch._dynamo) they would keep
# the workers' gloo group alive (see _release_group).
import torch.distributed.nn  # noqa: F401
import torch.multiprocessing as mp

from adai_kernels import Adai
from cases import cpu_backends, make_grads, make_groups, set_grads

BACKENDS = [b for b in cpu_backends() if b != "triton"]  # interpreter: too slow for 2 procs
WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(backend, max_norm):
    groups = make_groups()
    opt = Adai(groups, lr=1.0, backend=backend, max_grad_norm=max_norm)
    for k in range(STEPS):
        set_grads(groups, make_grads(groups, k))
        opt.step()
    return groups, opt


def _sharded(rank, backend, max_norm):
    """ZeRO-style: every other tensor of every group lives on this rank."""
    full = make_groups()
    mine = [dict(g, params=[p for i, p in enumerate(g["params"]) if i % WORLD == rank])
            for g in full]
    opt = Adai(mine, lr=1.0, backend=backend, max_grad_norm=max_norm,
               process_group=dist.group.WORLD)
    for k in range(STEPS):
        set_grads(full, make_grads(full, k))  # grads of the other rank's tensors are unused
        opt.step()
    expected, ref = _single_process(backend, max_norm)
    for g, e in zip(full, expected):
        for i, (p, q) in enumerate(zip(g["params"], e["params"])):
            if i % WORLD == rank:
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.grad_norm, ref.grad_norm, rtol=1e-9, atol=0)


def _mlp():
    torch.manual_seed(0)
    # 3 output rows: dim-0 shards of 2 and 1 rows, an uneven split
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train_both(rank, model, opt, single, opt_single, gen):
    """STEPS steps of `model` on this rank's half of each batch and of `single` on all of it
    (batches drawn from `gen`)."""
    for _ in range(STEPS):
        x, y = torch.randn(8, 10, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank::WORLD]), y[rank::WORLD]).backward()
        opt.step()
        opt_single.zero_grad()
        torch.nn.functional.mse_loss(single(x), y).backward()
        opt_single.step()


def _ddp(rank, backend):
    """DDP replicas: gradients are averaged by DDP, no collective is needed in the step."""
    model, single = _mlp(), _mlp()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = Adai(ddp.parameters(), lr=0.05, backend=backend)
    opt_single = Adai(single.parameters(), lr=0.05, backend=backend)
    _train_both(rank, ddp, opt, single, opt_single, torch.Generator().manual_seed(1))
    for p, q in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _fsdp(rank, backend, max_norm, ckpt_dir):
    """FSDP2 (fully_shard): DTensor parameters sharded on dim 0; the statistics are summed
    over the mesh. Then a sharded checkpoint round-trips through torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, single = _mlp(), _mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = Adai(model.parameters(), lr=0.05, weight_decay=1e-3, backend=backend,
               max_grad_norm=max_norm)
    opt_single = Adai(single.parameters(), lr=0.05, weight_decay=1e-3, backend=backend,
                      max_grad_norm=max_norm)
    gen = torch.Generator().manual_seed(2)
    _train_both(rank, model, opt, single, opt_single, gen)
    for p, q in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(p.full_tensor(), q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.grad_norm, opt_single.grad_norm, rtol=1e-6, atol=0)

    saved = opt.state_dict()
    full = {i: {k: v if k == "step" else v.full_tensor() for k, v in e.items()}
            for i, e in saved["state"].items()}
    for i, e in opt_single.state_dict()["state"].items():
        assert full[i]["step"] == e["step"]
        torch.testing.assert_close(full[i]["exp_avg_sq"], e["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt_dir)
    x = torch.randn(8, 10, generator=gen)
    model(x).sum().backward()
    opt.step()  # the live state moves on
    template = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(template, checkpoint_id=ckpt_dir)
    set_optimizer_state_dict(model, opt, template["optim"])
    for i, e in opt.state_dict()["state"].items():
        assert e["step"] == full[i]["step"]
        for k in ("exp_avg", "exp_avg_sq", "beta1_prod"):
            assert torch.equal(e[k].full_tensor(), full[i][k])


def _release_group():
    """Free the destroyed gloo group now, not at exit: only its destructor stops its worker
    threads, and one still running while the interpreter finalizes is killed as it takes the
    GIL (to free a finished collective's tensors) inside a noexcept destructor: "terminate
    called without an active exception", SIGABRT. FSDP2's state (in reference cycles) and
    the device meshes that DTensor's caches keep still hold it."""
    from torch.distributed.device_mesh import DeviceMesh
    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh):
            obj._pg_registry.clear()
    gc.collect()


def _worker(rank, port, backend, errors, ckpt):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    world = weakref.ref(dist.group.WORLD)
    try:
        torch.set_num_threads(1)
        _sharded(rank, backend, None)
        _sharded(rank, backend, 0.5)
        _ddp(rank, backend)
        _fsdp(rank, backend, None, os.path.join(ckpt, "a"))
        _fsdp(rank, backend, 0.05, os.path.join(ckpt, "b"))
    except Exception as e:  # reported to the parent, which fails the test
        with open(os.path.join(errors, f"rank{rank}"), "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()
        _release_group()
    assert world() is None, "the gloo group outlived destroy_process_group"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_ddp_fsdp2_match_single_process(backend):
    with tempfile.TemporaryDirectory() as errors, tempfile.TemporaryDirectory() as ckpt:
        try:
            mp.spawn(_worker, args=(_free_port(), backend, errors, ckpt), nprocs=WORLD,
                     join=True)
        except Exception:
            msgs = [open(os.path.join(errors, f)).read() for f in sorted(os.listdir(errors))]
            pytest.fail("; ".join(msgs) or "a worker failed")
