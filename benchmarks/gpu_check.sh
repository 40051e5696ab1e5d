#!/usr/bin/env bash
# GPU check in one call, for a machine with an NVIDIA GPU, python3 and no network:
#
#   bash benchmarks/gpu_check.sh OUTDIR                      # ends within GPU_CHECK_TOTAL_S (280 s)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh OUTDIR  # every stage, tiny, on the CPU
#
# OUTDIR gets three files: gpu_check.log, summary.json and details.tar.gz (benchmarks/gpu_check.py
# says what is in them, which stages run, and the knobs). This wrapper only makes the package
# importable and starts the driver:
#   - already installed from this checkout: used as it is;
#   - else `pip install --no-deps --no-build-isolation --no-index -e .` (nothing is downloaded;
#     not in a dry run, which leaves the environment as it is);
#   - if that fails, in a dry run, or with GPU_CHECK_INSTALL=checkout: run from the checkout,
#     through PYTHONPATH and a temporary folder that maps lstmgru._kernels onto kernels/ (as
#     the install does).
# The install output goes into the log; how the package was found is recorded in summary.json.
# GPU_CHECK_PYTHON picks the interpreter (default python3).
# Exit status: 0 when every stage ended ok (or skipped / absent), 1 otherwise, 2 on bad usage.
set -uo pipefail   # no -e: a failed step is recorded and the check goes on

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
GPU_CHECK_T0=$(date +%s)   # the time budget counts from here
export GPU_CHECK_T0
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd) || exit 2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
cd "$REPO" || exit 2
PYTHON=${GPU_CHECK_PYTHON:-python3}
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Whether lstmgru and lstmgru._kernels import from this checkout.
imports_from_checkout() {
    "$PYTHON" - "$REPO" >>"$LOG" 2>&1 <<'EOF'
import os, sys
import lstmgru, lstmgru._kernels
repo = os.path.realpath(sys.argv[1])
found = [os.path.dirname(os.path.realpath(m.__file__)) for m in (lstmgru, lstmgru._kernels)]
sys.exit(0 if found == [os.path.join(repo, "lstmgru"), os.path.join(repo, "kernels")] else 1)
EOF
}

SHADOW=""
if [[ ${GPU_CHECK_INSTALL:-auto} == checkout ]]; then
    note="pip install not tried (GPU_CHECK_INSTALL=checkout)"
elif imports_from_checkout; then
    note="already installed from this checkout"
elif [[ ${GPU_CHECK_DRY_RUN:-0} != 0 ]]; then
    note="pip install not tried (dry run: the environment is left as it is)"
elif "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1 \
        && imports_from_checkout; then
    note="installed: pip install --no-deps --no-build-isolation --no-index -e ."
else
    note="pip install -e . failed (see the log)"
fi
if [[ $note != already* && $note != installed* ]]; then
    # lstmgru from the checkout, and lstmgru._kernels -> kernels/ (a bare PYTHONPATH lacks it).
    SHADOW=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check-path.XXXXXX")
    mkdir "$SHADOW/lstmgru"
    for entry in "$REPO"/lstmgru/*; do
        [[ $(basename "$entry") == __pycache__ ]] || ln -s "$entry" "$SHADOW/lstmgru/"
    done
    ln -s "$REPO/kernels" "$SHADOW/lstmgru/_kernels"
    export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
    if imports_from_checkout; then
        note="$note; running from the checkout (PYTHONPATH)"
    else
        note="$note; lstmgru does not import from the checkout either (see the log)"
    fi
fi
export GPU_CHECK_INSTALL_NOTE=$note
echo "=== package: $note" | tee -a "$LOG"

"$PYTHON" benchmarks/gpu_check.py "$OUTDIR"
status=$?
if [[ $status -ne 0 && ! -s "$OUTDIR/summary.json" ]]; then
    echo "=== gpu_check.py ended with status $status before writing summary.json" | tee -a "$LOG"
fi
[[ -n $SHADOW ]] && rm -rf "$SHADOW"
exit $status
