"""The stochastic rounding hash and rounding (csrc/adai_random.h), as the C++ kernels, the
Triton kernels and the reference backend (adai_kernels/rounding.py) compute them: identical
bits in all three, uniform bits, and an unbiased rounding."""
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

from adai_kernels import rounding as R

try:  # the kernel's globals must be the module's, where triton.jit looks them up
    import triton
    import triton.language as tl

    from adai_kernels.backends import triton_random as tr

    @triton.jit
    def draw(index_ptr, x_ptr, bits_ptr, out_ptr, seed, step, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        stream = tr.rounding_stream(seed.to(tl.uint32), step.to(tl.uint32))
        bits = tr.rounding_bits(stream, tl.load(index_ptr + offs, mask=mask, other=0))
        tl.store(bits_ptr + offs, bits.to(tl.int64), mask=mask)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, tr.bf16_round_stochastic(x, bits), mask=mask)
except ImportError:
    triton = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"),
           3.3895313892515355e38, -3.3895313892515355e38, 1e-40, -1e-40, 1.0 + 2 ** -10]


def _inputs(n: int):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    index = torch.cat([torch.tensor([0, 1, 2**32 - 1, 2**32, 2**40, (7 << 40) + 5, 2**62]),
                       torch.randint(0, 2**62, (n,), generator=gen)])
    x = torch.cat([torch.tensor(SPECIAL),
                   torch.randn(index.numel() - len(SPECIAL), generator=gen)
                   * torch.exp2(torch.randint(-100, 100, (index.numel() - len(SPECIAL),),
                                              generator=gen).float())])
    seed = int(torch.randint(0, 2**32, (), generator=gen))
    step = int(torch.randint(1, 2**32, (), generator=gen))
    return seed, step, index, x.float()


def _torch(seed, step, index, x):
    stream = R.rounding_stream(torch.tensor(seed), torch.tensor(step))
    bits = R.rounding_bits(stream, index)
    return bits, R.bf16_round_stochastic(x, bits).view(torch.int16).to(torch.int64) & 0xFFFF


def _cxx():
    for cand in (os.environ.get("CXX"), sysconfig.get_config_var("CXX"), "c++", "g++"):
        if cand and shutil.which(cand.split()[0]):
            return shutil.which(cand.split()[0])
    return None


def test_cxx_and_torch_draw_the_same_bits(tmp_path):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path / "rounding_check")
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-I",
           os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "rounding_check.cpp"),
           "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, " ".join(cmd) + "\n" + build.stdout + build.stderr
    seed, step, index, x = _inputs(5000)
    xbits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    stdin = f"{seed} {step} {index.numel()}\n" + "".join(
        f"{i} {b}\n" for i, b in zip(index.tolist(), xbits.tolist()))
    run = subprocess.run([exe], input=stdin, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = torch.tensor([[int(v) for v in line.split()] for line in run.stdout.splitlines()])
    bits, rounded = _torch(seed, step, index, x)
    assert torch.equal(got[:, 0], bits), "rounding_bits differ between C++ and torch"
    assert torch.equal(got[:, 1], rounded), "bf16_round_stochastic differs between C++ and torch"


def test_triton_and_torch_draw_the_same_bits():
    if triton is None:
        pytest.skip("no triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off")
    seed, step, index, x = _inputs(3000)
    bits = torch.empty_like(index)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    draw[(triton.cdiv(index.numel(), 512),)](index, x, bits, out, seed, step, index.numel(),
                                             BLOCK=512)
    want_bits, want_rounded = _torch(seed, step, index, x)
    assert torch.equal(bits & 0xFFFFFFFF, want_bits)
    assert torch.equal(out.view(torch.int16).to(torch.int64) & 0xFFFF, want_rounded)


def test_bits_are_uniform():
    """Every bit of the hash is set in half the draws (consecutive indices, one stream: the
    case of one tensor's elements), within 6 standard deviations."""
    n = 1 << 18
    seed, step = int(torch.randint(0, 2**32, ())), int(torch.randint(1, 1000, ()))
    bits = R.rounding_bits(R.rounding_stream(torch.tensor(seed), torch.tensor(step)),
                           torch.arange(n) + (3 << 40))
    ones = torch.stack([(bits >> k) & 1 for k in range(32)]).double().mean(1)
    assert (ones - 0.5).abs().max() < 6 * 0.5 / n ** 0.5, ones
    # and between neighbouring steps: the streams of step and step + 1 are unrelated
    other = R.rounding_bits(R.rounding_stream(torch.tensor(seed), torch.tensor(step + 1)),
                            torch.arange(n) + (3 << 40))
    agree = ((bits ^ other) & 1).double().mean()
    assert abs(agree - 0.5) < 6 * 0.5 / n ** 0.5


def test_rounding_is_unbiased():
    """x rounds to one of its two bf16 neighbours, up (away from zero) with probability
    (dropped bits) / 2^16, so the mean of many roundings is x: checked to 6 standard
    deviations, where rounding to nearest is off by up to half a bf16 ulp."""
    n = 1 << 14
    x = torch.randn(64) * torch.exp2(torch.randint(-20, 20, (64,)).float())
    u = x.view(torch.int32).to(torch.int64) & R.MASK32
    as_float = lambda v: (v - ((v & 0x80000000) << 1)).to(torch.int32).view(torch.float32)
    down, up = as_float(u & 0xFFFF0000).double(), as_float((u & 0xFFFF0000) + 0x10000).double()
    p_up = (u & 0xFFFF).double() / 65536
    stream = R.rounding_stream(torch.tensor(int(torch.randint(0, 2**32, ()))), torch.tensor(1))
    bits = R.rounding_bits(stream, torch.arange(n * x.numel()).reshape(x.numel(), n))
    rounded = R.bf16_round_stochastic(x[:, None].expand(-1, n), bits).double()
    assert ((rounded == down[:, None]) | (rounded == up[:, None])).all()
    sigma = (p_up * (1 - p_up) / n).sqrt()
    assert ((rounded == up[:, None]).double().mean(1) - p_up).abs().le(6 * sigma + 1e-12).all()
    mean_err = (rounded.mean(1) - x.double()) / (up - down).abs()
    assert mean_err.abs().le(6 * sigma + 1e-9).all(), mean_err
    nearest_err = (x.bfloat16().double() - x.double()) / (up - down).abs()
    assert nearest_err.abs().max() > 0.1  # what the stochastic rounding is there to remove


def test_special_values_round_as_documented():
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0])
    bits = torch.full((x.numel(),), 0xFFFF, dtype=torch.int64)  # the most rounding up there is
    out = R.bf16_round_stochastic(x, bits).float()
    assert torch.isnan(out[0])
    assert out[1] == float("inf") and out[2] == float("-inf")
    assert out[3] == 0.0 and out[4] == 0.0 and torch.signbit(out[4])
    assert out[5] == 1.0  # exact in bf16: no dropped bits, nothing to round up
