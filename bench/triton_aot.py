"""The Triton kernels compiled ahead of time, without a GPU: every kernel of
adai_kernels/backends/triton_kernels.py with the signatures and constexprs the backend
launches it with (adai_kernels/backends/triton.py, `launch_specs`), for CUDA and ROCm
targets, with each compiled kernel's registers and spills and its PTX / TTGIR / AMDGCN.

Registers and spills are read from the cubin (cuobjdump) and from the AMDGCN metadata:
Triton's own `n_regs` and `n_spills` are filled in by the driver when a kernel is loaded,
so they stay unknown without a GPU.

Triton decides when it is imported whether kernels run interpreted (TRITON_INTERPRET=1, as
the CPU test suite sets it), so `compile_all` compiles in fresh processes without it, two
at once:

    python -m bench.triton_aot OUT.json --target sm_80 gfx942
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> triton GPUTarget(backend, arch, warp size)
TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32),
           "gfx942": ("hip", "gfx942", 64)}
# every variant for the H100/H200 target, whose code tests/test_compiled_kernels.py checks
# most closely; the usual launch of each dtype for the others (compile time)
EVERY_VARIANT = ("sm_90",)


def variants(spec, every: bool = True) -> list[tuple[str, dict]]:
    """The launches of one kernel that are compiled, as (label, chosen constexprs): for each
    dtype code the usual one (every choice at its first value) and, with `every`, the one
    with every other option at its last value, pointers still aligned; then, with `every`,
    that one with unaligned pointers (the *_ALIGNED choices at their last value) for the last
    code (bf16: params narrower than the states)."""
    choices = spec.choices
    align = [k for k in choices if k.endswith("_ALIGNED")]
    usual = {k: v[0] for k, v in choices.items()}
    options = usual | {k: v[-1] for k, v in choices.items() if k not in align}
    codes = choices.get("CODE", (None,))

    def at(code):
        return {} if code is None else {"CODE": code}

    out = []
    for code in codes:
        out.append(("usual", usual | at(code)))
        if every and options != usual:
            out.append(("options", options | at(code)))
    if every and align:
        out.append(("unaligned", options | {k: choices[k][-1] for k in align} | at(codes[-1])))
    return out


def _cuda_resources(cubin: bytes) -> dict:
    from bench.cubin import resource_usage

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        (u,) = resource_usage(f.name)
    return dict(registers=u.registers, spill_bytes=u.stack + u.local)


def _amd_resources(amdgcn: str) -> dict:
    def field(name):
        return int(re.search(rf"\.{name}:\s+(\d+)", amdgcn).group(1))

    return dict(vgprs=field("vgpr_count"), sgprs=field("sgpr_count"),
                spills=field("vgpr_spill_count") + field("sgpr_spill_count"))


def compile_target(target: str) -> dict:
    """The `variants` of every kernel compiled for `target` (in a process that does not
    interpret)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adai_kernels.backends import triton_kernels as K
    from adai_kernels.backends.triton import launch_specs

    backend, arch, warp = TARGETS[target]
    gpu = GPUTarget(backend, arch, warp)
    dtypes = {K.F32: "fp32", K.F16: "fp16", K.BF16: "bf16"}
    kernels = []
    t0 = time.perf_counter()
    for name, spec in launch_specs(K).items():
        fn = getattr(K, name)
        for label, chosen in variants(spec, every=target in EVERY_VARIANT):
            constexprs = spec.fixed | chosen
            # the runtime arguments in the kernel's order; a name missing from the table
            # (or one too many) fails here
            sig = {a: "constexpr" if a in constexprs else spec.signature[a]
                   for a in fn.arg_names}
            assert len(sig) - len(constexprs) == len(spec.signature), (name, sig)
            t = time.perf_counter()
            k = triton.compile(ASTSource(fn, sig, constexprs), target=gpu,
                               options=dict(num_warps=spec.num_warps))
            entry = dict(kernel=name, variant=label, dtype=dtypes.get(chosen.get("CODE")),
                         chosen=chosen, constexprs=constexprs,
                         num_warps=spec.num_warps, warp_size=warp,
                         seconds=time.perf_counter() - t)
            if backend == "cuda":
                entry |= _cuda_resources(k.asm["cubin"])
                entry["asm"] = {key: k.asm[key] for key in ("ptx", "ttgir")}
            else:
                entry |= _amd_resources(k.asm["amdgcn"])
                entry["asm"] = {key: k.asm[key] for key in ("amdgcn", "ttgir")}
            kernels.append(entry)
    return dict(target=target, triton=triton.__version__, ptxas=_ptxas_version(backend, arch),
                seconds=time.perf_counter() - t0, kernels=kernels)


def _ptxas_version(backend: str, arch) -> str | None:
    if backend != "cuda":
        return None
    from triton.backends.nvidia.compiler import get_ptxas

    from bench.cubin import tool_version
    return tool_version(get_ptxas(arch).path)


def compile_all(targets=tuple(TARGETS), timeout: float = 600) -> dict:
    """{target: compile_target's result, or {"error": why}}, without TRITON_INTERPRET: the
    EVERY_VARIANT targets in one fresh process, the others in a second one beside it (an
    import of torch and triton costs about as much as compiling a target's usual launches)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in
                                                       [env.get("PYTHONPATH")] if p])
    groups = [g for g in ([t for t in targets if t in EVERY_VARIANT],
                          [t for t in targets if t not in EVERY_VARIANT]) if g]
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")  # compiles what is here now
        procs = []
        for i, group in enumerate(groups):
            out = os.path.join(tmp, f"{i}.json")
            procs.append((group, out, subprocess.Popen(
                [sys.executable, "-m", "bench.triton_aot", out, "--target", *group],
                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True)))
        results = {}
        for group, out, proc in procs:
            try:
                log, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                log = proc.communicate()[0] + f"\ntimed out after {timeout} s"
            if proc.returncode != 0:
                lines = log.strip().splitlines()
                why = lines[-1] if lines else f"exit status {proc.returncode}"
                results |= {t: {"error": why, "log": log} for t in group}
                continue
            results |= json.loads(Path(out).read_text())
    return {t: results[t] for t in targets}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.triton_aot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file to write: {target: result}")
    ap.add_argument("--target", nargs="+", choices=sorted(TARGETS), required=True)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1: kernels would be interpreted, not compiled", file=sys.stderr)
        return 2
    results = {}
    for target in args.target:
        try:
            results[target] = compile_target(target)
        except Exception as e:  # reported per target: the others still compile
            first = (str(e).strip().splitlines() or [""])[0]
            results[target] = {"error": f"{type(e).__name__}: {first}",
                               "log": traceback.format_exc()}
    Path(args.out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
