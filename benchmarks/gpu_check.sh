#!/usr/bin/env bash
# GPU check of issue 7, one prepared script for one H200 (under 8 minutes):
#   1. the GPU benchmark: dsv3 shape (D=7168 H=2048, 32 local experts of 256, k=8), bf16, torch and JAX,
#      achieved TFLOP/s of grouped_mm and % of the H200's ~790 TFLOP/s dense bf16 peak (target >= 60%);
#   2. the GPU parity run: torch:cuda vs jax:gpu vs torch:cpu (and the float64 reference inside the
#      harness), float32 with jax_default_matmul_precision="highest", and bfloat16.
# Usage: benchmarks/gpu_check.sh [OUT_DIR]     (default: $OUT, else ./gpu-results)
# Writes OUT_DIR/summary.md (the verdict lines and tables), OUT_DIR/gpu_check.log and
# OUT_DIR/gpu-results.tar.gz (every JSON report, markdown table and plot).
#
# Python: uses python3 when it already imports torch (CUDA), jax (GPU), flax, rich, safetensors (the
# device image has them); otherwise installs them with pip, from ./.whl when that folder exists
# (offline machines: carry wheels there), else from the network, each step under a timeout.
# GPU_CHECK_DRY=1 runs every step on the CPU at toy sizes without installing anything (to test the
# script on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${1:-${OUT:-./gpu-results}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
WORK=$DIR/work
mkdir -p "$WORK"
LOG=$DIR/gpu_check.log
SUMMARY=$DIR/summary.md
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
say() { echo "[$(( $(date +%s) - START ))s] $*"; }
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then
  TDEV=cpu; BENCH_EXTRA="--sizes 64,128,8,2,256 --quick"; PARITY_BACKENDS=torch:cpu,jax:cpu
else
  TDEV=cuda; BENCH_EXTRA="--rounds 10"; PARITY_BACKENDS=torch:cuda,jax:gpu,torch:cpu
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# torch and JAX share the GPU in the parity run: no preallocation of 75% of memory by XLA
export XLA_PYTHON_CLIENT_PREALLOCATE=false
: > "$SUMMARY"

# ---------------------------------------------------------------------------------- environment
say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$WORK/nvidia-smi.txt"
check_env() {
  DRY=$DRY timeout 120 "$PY" - <<'EOF'
import os, sys
DRY = os.environ.get("DRY") == "1"
missing = []
try:
    import torch
    assert torch.cuda.is_available() or DRY, "torch sees no CUDA device"
    import torch.nn.functional as F
    assert hasattr(F, "grouped_mm"), f"torch {torch.__version__} has no F.grouped_mm (need >= 2.10)"
except Exception as exc:
    missing.append(f"torch: {exc}")
try:
    import jax
    assert jax.default_backend() == "gpu" or DRY, f"jax backend is {jax.default_backend()}"
    import flax  # noqa: F401
except Exception as exc:
    missing.append(f"jax: {exc}")
for name in ("numpy", "safetensors", "rich", "matplotlib"):
    try:
        __import__(name)
    except Exception as exc:
        missing.append(f"{name}: {exc}")
print("\n".join(missing) if missing else "environment ok")
sys.exit(1 if missing else 0)
EOF
}
if ! check_env && [ "$DRY" != 1 ]; then
  say "installing what is missing (pip, with timeouts)"
  PIPI="$PY -m pip install -q --disable-pip-version-check"
  if [ -d "$ROOT/.whl" ]; then
    timeout 300 $PIPI --no-index --find-links "$ROOT/.whl" torch "jax[cuda12]" flax safetensors rich matplotlib numpy \
      || timeout 300 $PIPI --no-index --find-links "$ROOT/.whl" --no-deps "$ROOT"/.whl/*.whl
  else
    timeout 300 $PIPI torch --index-url https://download.pytorch.org/whl/cu128
    timeout 240 $PIPI "jax[cuda12]" "flax>=0.11" "safetensors>=0.4" "rich>=13" "matplotlib>=3.7" "numpy>=1.24"
  fi
  check_env || { say "environment still incomplete: see above"; echo "environment incomplete (see gpu_check.log)" >> "$SUMMARY"; }
fi
"$PY" -c "import torch, jax; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name()); print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$WORK/versions.txt"
# peers are optional: transformers is in the image; torchtitan is skipped (with the reason) when absent

# -------------------------------------------------------------------------------------- benchmark
# torch and JAX in separate processes so neither allocator holds memory the other needs.
say "benchmark: dsv3 bf16, torch on cuda"
timeout 200 "$PY" benchmarks/bench_moe.py --config dsv3 --backend torch --device $TDEV --dtype bfloat16 \
  $BENCH_EXTRA --json "$WORK/bench_torch_dsv3_bf16.json" > "$WORK/bench_torch_dsv3_bf16.txt"
say "  exit $?"; cat "$WORK/bench_torch_dsv3_bf16.txt"
say "benchmark: dsv3 bf16, jax on gpu"
timeout 150 "$PY" benchmarks/bench_moe.py --config dsv3 --backend jax --dtype bfloat16 \
  $BENCH_EXTRA --json "$WORK/bench_jax_dsv3_bf16.json" > "$WORK/bench_jax_dsv3_bf16.txt"
say "  exit $?"; cat "$WORK/bench_jax_dsv3_bf16.txt"

# ----------------------------------------------------------------------------------------- parity
say "parity float32 (jax_default_matmul_precision=highest)"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 100 "$PY" -m parity.cli run --backends $PARITY_BACKENDS \
  --dtype float32 --quiet --out "$WORK/parity_float32" > "$WORK/parity_float32.txt" 2>&1
say "  exit $? (0 = every check passed)"; cat "$WORK/parity_float32.txt"
say "parity bfloat16"
timeout 100 "$PY" -m parity.cli run --backends $PARITY_BACKENDS \
  --dtype bfloat16 --quiet --out "$WORK/parity_bfloat16" > "$WORK/parity_bfloat16.txt" 2>&1
say "  exit $? (0 = every check passed)"; cat "$WORK/parity_bfloat16.txt"

# ---------------------------------------------------------------------------------------- summary
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - START )) s)"
  echo; echo '```'; cat "$WORK/versions.txt"; cat "$WORK/nvidia-smi.txt"; echo '```'
  for f in bench_torch_dsv3_bf16 bench_jax_dsv3_bf16 parity_float32 parity_bfloat16; do
    echo; echo "## $f"; echo '```'; cat "$WORK/$f.txt" 2>/dev/null || echo "(missing)"; echo '```'
  done
} >> "$SUMMARY"
tar -czf "$DIR/gpu-results.tar.gz" -C "$DIR" work
# $OUT on the device machine returns at most 8 files, 2 folders down: keep the tarball, not the tree
if [ -n "${OUT:-}" ] && [ "$DIR" = "$(cd "$OUT" && pwd)" ]; then rm -rf "$WORK"; fi
say "done: $SUMMARY"
