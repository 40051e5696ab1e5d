#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no network; the whole script ends within 8 minutes.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Writes into OUTDIR:
#   install.log         pip install -e . (no deps, no build isolation: nothing is downloaded)
#   env.txt             nvidia-smi, python / torch / CUDA / triton / cuDNN versions, TF32 flags
#   gpu_tests.log       python -m pytest -m gpu -q tests (a failure is recorded, the script goes on)
#   gpu.json/.md/.png   python benchmarks/bench.py --preset gpu (time-boxed; configs it had no time
#                       for are listed in gpu.json meta.skipped), bench.log its console output
#   summary.txt         exit codes and timings
# Environment knobs: GPU_CHECK_TOTAL_S (default 480), GPU_CHECK_TESTS_MAX_S (default 210),
# GPU_CHECK_BENCH_ARGS (extra bench.py flags; grid flags replace the gpu preset's axes).
# Exit status: non-zero when the GPU tests failed (or collected nothing), or the benchmark failed.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}     # the whole script: 8 minutes
TESTS_MAX_S=${GPU_CHECK_TESTS_MAX_S:-210}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-}  # extra bench.py flags, e.g. "--dtype bfloat16 --mode training"
MARGIN_S=25                           # kept back for the bench's report, plot and exit

mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
SECONDS=0

echo "== install" >&2
python -m pip install --no-deps --no-build-isolation -e . 2>&1 | tee "$OUTDIR/install.log"

echo "== environment" >&2
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi || echo "nvidia-smi failed"
    else
        echo "nvidia-smi: not found"
    fi
    echo
    python - <<'EOF'
import importlib.metadata, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    print("triton", importlib.metadata.version("triton"))
except importlib.metadata.PackageNotFoundError:
    print("triton", None)
print("cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("tf32: cuda.matmul.allow_tf32 =", torch.backends.cuda.matmul.allow_tf32,
      " cudnn.allow_tf32 =", torch.backends.cudnn.allow_tf32)
import lstmgru
print("lstmgru", getattr(lstmgru, "__version__", "?"), lstmgru.__file__)
EOF
} > "$OUTDIR/env.txt" 2>&1 || echo "environment probe failed (see env.txt)" >&2
cat "$OUTDIR/env.txt" >&2

echo "== GPU tests (at most ${TESTS_MAX_S}s)" >&2
set +e
timeout -k 10 "$TESTS_MAX_S" python -m pytest -m gpu -q tests 2>&1 | tee "$OUTDIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
case $tests_rc in
    0) ;;
    5) echo "GPU tests: none collected (pytest exit 5)" | tee -a "$OUTDIR/gpu_tests.log" >&2 ;;
    124|137) echo "GPU tests: timed out after ${TESTS_MAX_S}s" | tee -a "$OUTDIR/gpu_tests.log" >&2 ;;
    *) echo "GPU tests: FAILED (pytest exit $tests_rc)" >&2 ;;
esac
tests_s=$SECONDS

# The benchmark gets what is left. --deadline: no config starts after it; --total-budget spreads the
# timing over the configs; timeout is the last resort for a hung kernel (gpu.json is rewritten
# after every config, so it survives a kill).
left=$(( TOTAL_S - SECONDS - MARGIN_S ))
bench_rc=0
if (( left < 90 )); then
    echo "== benchmark skipped: only ${left}s left" | tee "$OUTDIR/bench.log" >&2
    bench_rc=3
else
    # a config started just before the deadline may still compile its kernels: keep 60 s for it
    deadline=$(( left - 60 ))
    echo "== benchmark (deadline ${deadline}s, hard limit ${left}s)" >&2
    set +e
    timeout -k 10 "$left" python benchmarks/bench.py --preset gpu --out-dir "$OUTDIR" --name gpu \
        --total-budget "$(( deadline - 15 ))" --deadline "$deadline" $BENCH_ARGS 2>&1 \
        | tee "$OUTDIR/bench.log"
    bench_rc=${PIPESTATUS[0]}
    set -e
    if (( bench_rc == 124 || bench_rc == 137 )); then
        echo "benchmark: killed at the ${left}s limit (gpu.json keeps the finished configs)" >&2
    fi
fi

{
    echo "gpu_tests_exit=$tests_rc"
    echo "gpu_tests_seconds=$tests_s"
    echo "bench_exit=$bench_rc"
    echo "total_seconds=$SECONDS"
} | tee "$OUTDIR/summary.txt" >&2

if (( tests_rc != 0 || bench_rc != 0 )); then
    exit 1
fi
