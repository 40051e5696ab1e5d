#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no network; the whole script ends within 8 minutes.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Writes into OUTDIR:
#   install.log         pip install -e . (no deps, no build isolation: nothing is downloaded)
#   env.txt             nvidia-smi, python / torch / CUDA / triton / cuDNN versions, TF32 flags
#   gpu_tests.log       the GPU tests and the kernel suites on CUDA tensors (a failure is
#                       recorded, the script goes on)
#   barrier.json/.log   benchmarks/barrier_bench.py: us per sync at P = 32, 64, 132, each scheme
#   compile.json/.md    benchmarks/compile_report.py --subset small on the device's triton
#   gpu-split.*, gpu-tiled.*  python benchmarks/bench.py --preset gpu with --backend
#                       triton-split / triton-tiled against cuDNN (time-boxed; configs it had no
#                       time for are listed in meta.skipped), bench-*.log their console output
#   published.*         B=16 T=1024 H=768 fp16 LSTM, against cuDNN's published 2.01 / 5.19 ms
#   variants-gpu.*      benchmarks/variants_bench.py --device cuda: each cell variant's overhead
#                       over the plain kernel, and reset= against cuDNN's pack/pad round trip
#   ncu.txt             one split-kernel launch under ncu --clock-control none, if ncu exists
#   summary.txt         exit codes and timings (every stage prints a timestamp)
# Environment knobs: GPU_CHECK_TOTAL_S (default 480), GPU_CHECK_TESTS_MAX_S (default 210),
# GPU_CHECK_BENCH_ARGS (extra bench.py flags; grid flags replace the gpu preset's axes).
# Exit status: non-zero when the GPU tests failed (or collected nothing), or the benchmark failed.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}     # the whole script: 8 minutes
TESTS_MAX_S=${GPU_CHECK_TESTS_MAX_S:-150}
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

stamp() { echo "== [$(date -u +%H:%M:%S) +${SECONDS}s] $*" >&2; }

stamp "GPU tests (at most ${TESTS_MAX_S}s)"
set +e
timeout -k 10 "$TESTS_MAX_S" python -m pytest -q tests/test_gpu.py tests/test_kernel_split.py \
    tests/test_kernel_lstm.py tests/test_kernel_gru.py 2>&1 | tee "$OUTDIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
case $tests_rc in
    0) ;;
    5) echo "GPU tests: none collected (pytest exit 5)" | tee -a "$OUTDIR/gpu_tests.log" >&2 ;;
    124|137) echo "GPU tests: timed out after ${TESTS_MAX_S}s" | tee -a "$OUTDIR/gpu_tests.log" >&2 ;;
    *) echo "GPU tests: FAILED (pytest exit $tests_rc)" >&2 ;;
esac
tests_s=$SECONDS

stamp "barrier micro-benchmark"
timeout -k 5 60 python benchmarks/barrier_bench.py --json "$OUTDIR/barrier.json" \
    > "$OUTDIR/barrier.log" 2>&1 || echo "barrier benchmark failed (see barrier.log)" >&2
cat "$OUTDIR/barrier.log" >&2

stamp "compile report (small subset, this triton)"
timeout -k 5 90 python benchmarks/compile_report.py --arch sm_90 --subset small \
    --json "$OUTDIR/compile.json" --md "$OUTDIR/compile.md" > "$OUTDIR/compile.log" 2>&1 \
    || echo "compile report failed (see compile.log)" >&2

# The benchmarks share what is left: split first (the family meant to beat cuDNN).
bench_rc=0
run_bench() {  # name, seconds, bench.py arguments...
    local name=$1 budget=$2
    shift 2
    if (( budget < 45 )); then
        echo "== $name skipped: only ${budget}s left" | tee "$OUTDIR/bench-$name.log" >&2
        bench_rc=3
        return
    fi
    stamp "benchmark $name (${budget}s)"
    set +e
    timeout -k 10 "$budget" python benchmarks/bench.py --out-dir "$OUTDIR" --name "$name" \
        --total-budget "$(( budget - 40 ))" --deadline "$(( budget - 30 ))" "$@" 2>&1 \
        | tee "$OUTDIR/bench-$name.log"
    local rc=${PIPESTATUS[0]}
    set -e
    (( rc == 0 )) || bench_rc=$rc
}
left=$(( TOTAL_S - SECONDS - MARGIN_S ))
run_bench published 60 --backend triton-split --op lstm --dtype float16 --batch 16 \
    --seq-len 1024 --hidden-size 768
stamp "cell variants against the plain kernels and cuDNN's pack/pad"
timeout -k 5 75 python benchmarks/variants_bench.py --device cuda --rounds 10 \
    --out-dir "$OUTDIR" --name variants-gpu > "$OUTDIR/variants.log" 2>&1 \
    || echo "variants benchmark failed (see variants.log)" >&2
left=$(( TOTAL_S - SECONDS - MARGIN_S ))
run_bench gpu-split $(( left * 2 / 3 )) --preset gpu --backend triton-split $BENCH_ARGS
left=$(( TOTAL_S - SECONDS - MARGIN_S ))
run_bench gpu-tiled "$left" --preset gpu --backend triton-tiled $BENCH_ARGS

if command -v ncu >/dev/null 2>&1 && (( TOTAL_S - SECONDS > 40 )); then
    stamp "ncu on one split launch"
    timeout -k 5 30 ncu --clock-control none --launch-count 1 -k regex:_lstm_fwd_kernel \
        python -c "import torch, lstmgru; m = lstmgru.LSTM(768, 768, device='cuda', dtype=torch.float16)
with lstmgru.use_backend('triton-split'), torch.no_grad(): m(torch.randn(64, 16, 768, device='cuda', dtype=torch.float16))" \
        > "$OUTDIR/ncu.txt" 2>&1 || echo "ncu failed or not permitted (see ncu.txt)" >&2
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
