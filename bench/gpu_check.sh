#!/usr/bin/env bash
# One-shot check on a GPU machine (no network; python3 with torch + CUDA, triton, nvcc,
# ninja, pytest): build the package with its CUDA kernels, run the GPU tests, time the fused
# step, run the benchmark CLI. Everything lands in $OUT (default ./gpu_out): build.log,
# pytest_gpu.log, pytest_triton.log, pytest_large.log, timing.json, bench.log, bench/gpu.{md,json},
# summary.txt. A short table is printed last. The whole run stays under ~8 minutes: every
# stage runs under `timeout`, capped by what is left of the overall budget.
#
#   bash bench/gpu_check.sh                 # from anywhere; works in the repository root
#   OUT=/tmp/x PYTHON=python3 bash bench/gpu_check.sh
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"  # overall wall-clock budget, seconds
START=$SECONDS
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

is_toolkit() { [ -n "${1:-}" ] && [ -f "$1/include/cuda_runtime.h" ] && [ -x "$1/bin/nvcc" ]; }
if ! is_toolkit "${CUDA_HOME:-}"; then
  CUDA_HOME=""
  for cand in /usr/local/cuda \
      "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")")"; do
    if is_toolkit "$cand"; then CUDA_HOME="$cand"; break; fi
  done
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export ADAI_REQUIRE_CUDA=1  # the GPU tests fail (rather than skip) if the kernels are missing

# run_stage NAME CAP_S LOG CMD...: runs CMD under timeout (min of CAP_S and the budget left,
# keeping RESERVE_S for the stages after it), logs to LOG, records status and time.
RESERVE_S=0
run_stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$((BUDGET_S - (SECONDS - START) - RESERVE_S))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    printf '%-14s %-9s %5s  %s\n' "$name" "skipped" "0" "(out of time budget)" >>"$SUMMARY"
    return 124
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log" >&2
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local status=ok
  [ $rc -ne 0 ] && status="rc=$rc"
  [ $rc -eq 124 ] && status="timeout"
  printf '%-14s %-9s %5s  %s\n' "$name" "$status" "$((SECONDS - t0))" \
    "$(tail -n 1 "$log" | cut -c1-90)" >>"$SUMMARY"
  return $rc
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
} >"$OUT/build.log"

# ---- 1. build (the package in place, with the CUDA kernels) -------------------------------
LOCK=()  # several builders may share a tree (a dev machine): build under the project's lock
command -v flock >/dev/null && LOCK=(flock /tmp/adai_build.lock)
RESERVE_S=230
run_stage build 240 "$OUT/build.log" \
  "${LOCK[@]}" "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e . ||
  run_stage build-inplace 200 "$OUT/build.log" "${LOCK[@]}" "$PY" setup.py build_ext --inplace
"$PY" - >>"$OUT/build.log" 2>&1 <<'EOF'
import torch, adai_kernels._native as n
print("cuda kernels:", n.has_cuda_kernels(), "| load error:", n.load_error())
EOF

# ---- 2. GPU tests (CUDA kernels and capture first; Triton's JIT compiles come after) -----
RESERVE_S=180
run_stage pytest-gpu 150 "$OUT/pytest_gpu.log" \
  "$PY" -m pytest -m gpu -q -rfEs --durations=10 -p no:cacheprovider \
  --deselect tests/test_triton_gpu.py tests/
RESERVE_S=130
run_stage pytest-triton 80 "$OUT/pytest_triton.log" \
  "$PY" -m pytest -m gpu -q -rfEs --durations=5 -p no:cacheprovider tests/test_triton_gpu.py
RESERVE_S=110
run_stage pytest-large 45 "$OUT/pytest_large.log" \
  env ADAI_TEST_LARGE=1 "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_cuda_gpu.py -k 2_pow_31

# ---- 3. inline timing: Adai(backend="cuda") vs torch Adam(fused) at 100M fp32 params ------
cat >"$OUT/.timing.py" <<'EOF'
import json, sys, torch
from adai_kernels import Adai

out = sys.argv[1]
dev = torch.device("cuda")
N_TENSORS, PER = 100, 1_000_000  # 100M fp32 parameters in 100 tensors
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "params": N_TENSORS * PER, "tensors": N_TENSORS}

def events_ms(fn, iters):
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters

# device-to-device copy bandwidth (read + write), 1 GiB
src = torch.empty(1 << 28, dtype=torch.float32, device=dev).normal_()
dst = torch.empty_like(src)
dst.copy_(src)
ms = events_ms(lambda: dst.copy_(src), 20)
res["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
del src, dst

gen = torch.Generator(device=dev).manual_seed(0)
def make():
    ps = [torch.nn.Parameter(torch.randn(PER, device=dev, generator=gen))
          for _ in range(N_TENSORS)]
    for p in ps:
        p.grad = torch.randn(PER, device=dev, generator=gen)
    return ps

for name, ctor, nbytes in (
        ("adai_cuda", lambda ps: Adai(ps, lr=1e-3, backend="cuda"), 40),
        ("adam_fused", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), 28)):
    ps = make()
    opt = ctor(ps)
    for _ in range(3):
        opt.step()
    ms = min(events_ms(opt.step, 10) for _ in range(3))
    res[name] = {"ms_per_step": ms, "bytes_per_param": nbytes,
                 "gbps": nbytes * N_TENSORS * PER / ms / 1e6}
    res[name]["pct_copy_bw"] = 100 * res[name]["gbps"] / res["copy_gbps"]
    del opt, ps
    torch.cuda.empty_cache()
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res))
EOF
RESERVE_S=70
run_stage timing 60 "$OUT/timing.log" "$PY" "$OUT/.timing.py" "$OUT/timing.json"
rm -f "$OUT/.timing.py"

# ---- 4. the benchmark CLI (bench/, quick profiles, no plots) ------------------------------
RESERVE_S=0
if [ -f bench/__main__.py ]; then
  left=$((BUDGET_S - (SECONDS - START) - 40))
  [ "$left" -gt 120 ] && left=120
  run_stage bench 170 "$OUT/bench.log" "$PY" -m bench --device cuda --quick --no-plots \
    --no-progress --name gpu --out "$OUT/bench" --budget-s "$((left > 20 ? left : 20))"
fi

# ---- summary ------------------------------------------------------------------------------
{
  echo
  "$PY" - "$OUT/timing.json" <<'EOF' 2>/dev/null || echo "(no timing results)"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['device']}: copy {r['copy_gbps']:.0f} GB/s (device-to-device)")
for k in ("adai_cuda", "adam_fused"):
    x = r[k]
    print(f"  {k:11s} {x['ms_per_step']:8.3f} ms/step  {x['gbps']:6.0f} GB/s "
          f"({x['bytes_per_param']} B/param, {x['pct_copy_bw']:.0f}% of copy)")
EOF
  grep -hE "passed|failed|skipped|error" "$OUT/pytest_gpu.log" 2>/dev/null | tail -n 1 | sed 's/^/pytest -m gpu: /'
  grep -hE "passed|failed|skipped|error" "$OUT/pytest_triton.log" 2>/dev/null | tail -n 1 | sed 's/^/pytest triton: /'
  grep -hE "passed|failed|skipped|error" "$OUT/pytest_large.log" 2>/dev/null | tail -n 1 | sed 's/^/pytest large:  /'
  echo "total $((SECONDS - START))s; logs in $OUT"
} >>"$SUMMARY"

echo
printf '%-14s %-9s %5s  %s\n' stage status secs "last log line"
cat "$SUMMARY"
