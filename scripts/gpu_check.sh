#!/usr/bin/env bash
# GPU check for npformer: the whole test suite on CuPy, then the CPU/GPU parity of every op, then
# the GPU benchmark when benchmarks/gpu_bench.py exists.
#
# Run it from the repository root on a machine with a CUDA GPU where numpy, cupy, pytest and
# hypothesis are already installed (nothing is installed here):
#
#     PYTHONPATH=. bash scripts/gpu_check.sh
#
# Time: the steps are capped at 240 s (suite), 120 s (parity) and 120 s (benchmark), so the script
# finishes within about 8 minutes even when a step hangs; if the machine is lent for a fixed time,
# start it with that time in mind, e.g. `timeout 500 bash scripts/gpu_check.sh`. Override the caps
# with SUITE_TIMEOUT, PARITY_TIMEOUT and BENCH_TIMEOUT (seconds), and the interpreter with PYTHON.
#
# Exit status: 0 when every step passed; otherwise the number of failed steps (a step that ran out
# of time counts as failed). A missing or unusable GPU fails at once, before the long steps.

set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
PYTHON="${PYTHON:-python}"
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...: run one step with a time cap, report, count failures
    local name=$1 limit=$2
    shift 2
    echo
    echo "==== ${name} (limit ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=10 "${limit}" "$@"
    local rc=$?
    if [[ $rc -eq 0 ]]; then
        echo "==== ${name}: passed in $((SECONDS - start)) s"
    else
        [[ $rc -eq 124 || $rc -eq 137 ]] && echo "==== ${name}: ran past ${limit} s"
        echo "==== ${name}: FAILED (exit ${rc}) after $((SECONDS - start)) s"
        failed=$((failed + 1))
    fi
}

echo "==== machine"
nvidia-smi || echo "nvidia-smi failed or is not installed"
"${PYTHON}" - <<'EOF' || { echo "==== no usable GPU: stopping"; exit 1; }
import platform, sys
import numpy
import npformer
from npformer import backend
print("python", platform.python_version(), "| numpy", numpy.__version__, "| npformer", npformer.__version__)
try:
    import cupy
    print("cupy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "| driver", cupy.cuda.runtime.driverGetVersion())
    for i in range(cupy.cuda.runtime.getDeviceCount()):
        print(f"device {i}:", cupy.cuda.runtime.getDeviceProperties(i)["name"].decode())
except Exception as exc:
    print("cupy:", type(exc).__name__, exc)
if not backend.gpu_available():
    print("npformer sees no GPU:", backend.gpu_unavailable_reason())
    sys.exit(1)
EOF

# NPFORMER_REQUIRE_GPU makes the parity tests fail, not skip, if the GPU were to vanish.
step "test suite on the GPU (NPFORMER_DEVICE=gpu)" "${SUITE_TIMEOUT:-240}" \
    env NPFORMER_DEVICE=gpu NPFORMER_REQUIRE_GPU=1 "${PYTHON}" -m pytest -q -x
step "CPU/GPU parity of every op" "${PARITY_TIMEOUT:-120}" \
    env NPFORMER_REQUIRE_GPU=1 "${PYTHON}" -m pytest -q -rs tests/test_gpu_parity.py
if [[ -f benchmarks/gpu_bench.py ]]; then
    step "GPU benchmark" "${BENCH_TIMEOUT:-120}" "${PYTHON}" benchmarks/gpu_bench.py
else
    echo
    echo "==== GPU benchmark: benchmarks/gpu_bench.py is absent; skipped"
fi

echo
if [[ $failed -eq 0 ]]; then
    echo "==== gpu_check: all steps passed"
else
    echo "==== gpu_check: ${failed} step(s) failed"
fi
exit "${failed}"
