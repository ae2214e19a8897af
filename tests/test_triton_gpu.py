"""backend="triton" compiled on a GPU: parity with the reference backend (fp32 tolerance; bitwise
parity with the CUDA backend is not required), determinism, clipping and skipped steps.
Skips without a GPU; tests/test_op_matrix.py (target triton) and tests/test_triton.py
cover the same kernels under the interpreter."""
import pytest
import torch

from adai_kernels import Adai, backends
from cases import PARAM_TOL, clone_groups, make_grads, make_groups, set_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def on_gpu(groups):
    for g in groups:
        g["params"] = [torch.nn.Parameter(p.detach().cuda()) for p in g["params"]]
    return groups


def run(groups, steps=4, **kwargs):
    opt = Adai(groups, lr=1.0, **kwargs)
    for k in range(steps):
        set_grads(groups, [[None if x is None else x.cuda() for x in row]
                           for row in make_grads(groups, k)])
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("extra", [{}, dict(max_grad_norm=3.0, skip_nonfinite=True)],
                         ids=["plain", "clipped"])
def test_triton_matches_reference_on_gpu(dtype, extra):
    why = backends.get("triton").unavailable(torch.device("cuda"))
    if why:
        pytest.skip(why)
    a = on_gpu(make_groups(dtype))
    b = on_gpu(clone_groups(make_groups(dtype)))
    c = on_gpu(clone_groups(make_groups(dtype)))
    opt_a = run(a, backend="triton", **extra)
    run(b, backend="reference", **extra)
    run(c, backend="triton", **extra)
    assert opt_a.backend == "triton"
    tol = PARAM_TOL[dtype]
    for ga, gb, gc in zip(a, b, c):
        for pa, pb, pc in zip(ga["params"], gb["params"], gc["params"]):
            torch.testing.assert_close(pa.double(), pb.double(), **tol)
            assert torch.equal(pa, pc)  # deterministic
