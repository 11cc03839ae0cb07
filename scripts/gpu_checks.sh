#!/usr/bin/env bash
# The Pallas kernels on a GPU: their tests compiled for the GPU (not interpreted; see
# tests/pallas_modes.py), then the kernel benchmarks at the sizes docs/benchmarks.md records.
#
#   scripts/gpu_checks.sh [OUT_DIR]      (default: $OUT, else runs/gpu_checks)
#
# Needs one NVIDIA GPU and a Python with jax[cuda], flax, optax, orbax-checkpoint, einops, pytest,
# pytest-xdist and pytest-timeout. Wheels in .whl/ (ml_collections for the benchmark's imports;
# flash-linear-attention and fla-core for the "vs fla" column, with torch and triton already
# installed) are installed into /tmp/site first; docs/benchmarks.md ("Owed") says how to fetch
# them. Every step has a time limit, and steps that no longer fit in GPU_CHECKS_SECONDS (default
# 510) are skipped, so one 10-minute call of a lent machine holds the run; the most wanted results
# come first. Writes into OUT_DIR (at most 5 files, as a lent machine returns 8): env.txt (device
# and versions), tests.log, bench.txt (every table, with any errors), bench_json.tar.gz (each
# run's rows) and, if any, failures.txt. Exits 1 if a step failed, ran out of time or was skipped.
# GPU_CHECKS_DRY_RUN=1 prints each step's command ("DRY: ...") instead of running it; the test
# suite checks those commands (tests/test_gpu_checks_script.py).
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_checks}}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # pytest workers and torch share the GPU
dry_run=${GPU_CHECKS_DRY_RUN:-}
if [ -z "$dry_run" ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
budget=${GPU_CHECKS_SECONDS:-510}  # the whole run; a step that cannot fit is skipped, and said so
step() {  # step SECONDS LOG command...: run with a time limit, append to LOG, note a failure
  local limit=$1 log=$2 left=$((budget - SECONDS))
  shift 2
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "SKIPPED (the ${budget} s budget is spent): $*" | tee -a "$log" "$out/failures.txt"
    status=1
    return
  fi
  if [ -n "$dry_run" ]; then
    echo "DRY: ${*@Q}"
    return
  fi
  echo "\$ $*" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", out of time after ${limit} s")): $*" \
      | tee -a "$log" "$out/failures.txt"
    status=1
  fi
}

if [ -z "$dry_run" ]; then
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__,
  jax.devices())'
    "$python" -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|flax|torch|triton|fla)"
  } >"$out/env.txt" 2>&1
  cat "$out/env.txt"
fi

# 1. The kernel tests, compiled for the GPU (the TPU driver's cases are skipped here).
step 180 "$out/tests.log" "$python" -m pytest -q -n 4 -p no:cacheprovider --timeout 150 \
  --durations 10 -rs tests/layers/test_pallas_attention.py tests/layers/test_pallas_gated_delta.py \
  tests/layers/test_pallas_selective_scan.py tests/layers/test_pallas_ssd.py

# 2. The benchmarks (16 heads of 128 throughout), the issues' targets first: forward+backward
# of gated delta and SSD against fla and of attention against cuDNN, the selective scan's forward
# against the HBM roofline; then the other modes.
json=$(mktemp -d)
bench() {  # bench NAME SECONDS flags...
  local name=$1 limit=$2
  shift 2
  step "$limit" "$out/bench.txt" "$python" -m ssm bench --repeats 5 --warmup 2 \
    --json "$json/$name.json" "$@"
}
gdn=(--ops gated_delta --batch 4 --lengths 8192 --features 2048 --gdn-head-dim 128
     --dtype bfloat16)
ssd=(--ops ssd --batch 4 --lengths 8192 --features 2048 --ssd-head-dim 128 --mamba-state 32
     --dtype bfloat16)
scan=(--ops selective_scan --batch 4 --lengths 8192 --features 2048 --mamba-state 16)
attn=(--ops window_attention --batch 1 --lengths 4096,16384,65536 --features 2048
      --attn-head-dim 128 --attn-window 2048 --dtype bfloat16)
bench gdn_grad 90 "${gdn[@]}" --grad
bench ssd_grad 75 "${ssd[@]}" --grad
bench attn_grad 60 "${attn[@]}" --grad
bench scan_fwd 30 "${scan[@]}"
bench gdn_fwd 45 "${gdn[@]}"
bench ssd_fwd 45 "${ssd[@]}"
bench attn_fwd 45 "${attn[@]}"
bench scan_grad 40 "${scan[@]}" --grad
tar -czf "$out/bench_json.tar.gz" -C "$json" .
exit $status
