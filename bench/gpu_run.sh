#!/usr/bin/env bash
# The GPU session in one script: the environment, the whole test suite run natively, the kernels under
# compute-sanitizer, the four kernel benchmarks, the text-generation benchmark, the training-throughput benchmark
# (also at the largest micro-batch that fits) and a profile of one training step. Each step logs to bench/results/gpu_run-<step>-<device>.log and runs under its
# own time limit; a step that fails or runs out of time is recorded and the next one runs. A summary of the steps
# comes last.
#
#   bash bench/gpu_run.sh STEP...   env tests sanitizer (= memcheck racecheck) kernels (= attention layernorm mlp
#                                   cross-entropy) generate throughput throughput-largest profile throughput-medium;
#                                   none: all of them (about 40 min on an H100)
#
# On any machine with an NVIDIA GPU, PyTorch and Triton, from the repository root. The project is installed first
# (`pip install -e .`, without dependencies or network) when `import tritongpt` fails. Each group of steps above takes
# 5-8 minutes, so they can also run as separate invocations; the Triton and Inductor caches make a second run on the
# same machine faster. With ARCHIVE_DIR set, bench/results/ is packed into ARCHIVE_DIR/gpu_run-<steps>.tar.gz after
# every step (with summary.txt beside it, and the profile's chrome traces), to carry the results off a machine that
# is about to go away; bench/results/ holds what to commit.
#
# Liger-Kernel (optional: bench_layernorm compares against it when it imports) is pure Python and needs only torch
# and triton. On a machine without a network, put its wheel in .whl/ (git-ignored), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5
# and this script installs .whl/*.whl into /tmp/site when it finds them.
set -u  # not -e: a failing step must not stop the others

cd "$(dirname "$0")/.."       # the repository root, where the benchmarks run as modules
unset TRITON_INTERPRET        # the kernels run natively here; tests/conftest.py sets it only where CUDA is missing
export PYTHONUNBUFFERED=1     # logs in order, and complete up to the moment a step is killed
PY=${PYTHON:-python3}         # on the GPU image python3 is the interpreter that has PyTorch
RESULTS=bench/results
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' ' '-')
DEVICE=${DEVICE:-no-GPU}      # the device part of the benchmarks' file names (bench.common.write_results)
SKIPPED=99                    # a step's exit status for "could not run here", told apart from a failure
export PY DEVICE SKIPPED
[ -n "${ARCHIVE_DIR:-}" ] && export ARCHIVE_DIR  # the profile step's traces go there
mkdir -p "$RESULTS"

if ! "$PY" -c "import tritongpt.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "cannot install the project"; exit 2; }
fi

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step_env() {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    "$PY" -c 'import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "cudnn", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")'
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|sentencepiece|transformers|pytest|liger)' || true
    echo "compute-sanitizer: $(sanitizer_path || echo 'not found')"
    echo "CPU cores: $(nproc)"; free -g; uname -r
    # These hashes say which code was measured.
    sha256sum kernels/*.py model/*.py tritongpt/*.py bench/*.py
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to PyTorch")'
}

sanitizer_path() {
    command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
        2>/dev/null | head -n1 | grep .
}

sanitize() {  # tool: each kernel forward and backward once (bench/sanitize_kernels.py) under compute-sanitizer
    local cs
    if ! cs=$(sanitizer_path); then
        echo "compute-sanitizer is not on PATH nor in /usr/local/cuda*/bin: skipped"
        return "$SKIPPED"
    fi
    # Without PyTorch's caching allocator every tensor is its own cudaMalloc, so a read past a tensor's end falls
    # outside any allocation, where memcheck sees it, rather than inside a cached block, where it does not.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$1" --error-exitcode 1 --print-limit 50 \
        --target-processes application-only "$PY" -m bench.sanitize_kernels
}

step_tests() { "$PY" -m pytest -q -rs --durations=20; }
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }
step_attention() { "$PY" -m bench.bench_attention; }
step_layernorm() { "$PY" -m bench.bench_layernorm; }
step_mlp() { "$PY" -m bench.bench_mlp; }
step_cross_entropy() { "$PY" -m bench.bench_linear_cross_entropy; }
step_generate() { "$PY" -m bench.bench_generate; }
step_throughput() { "$PY" -m bench.train_throughput --models gpt2; }
step_throughput_largest() {
    "$PY" -m bench.train_throughput --models gpt2 --variants a,c --largest-batch 512 --steps 5 --warmup 2
}
step_throughput_medium() { "$PY" -m bench.train_throughput --models gpt2-medium; }
step_profile() { "$PY" -m bench.profile_step --model gpt2 --variant c,b ${ARCHIVE_DIR:+--trace "$ARCHIVE_DIR"}; }
export -f step_env sanitizer_path sanitize step_tests step_memcheck step_racecheck step_attention step_layernorm \
    step_mlp step_cross_entropy step_generate step_throughput step_throughput_largest step_throughput_medium \
    step_profile

declare -A LIMIT=([env]=30 [tests]=330 [memcheck]=110 [racecheck]=90 [attention]=180 [layernorm]=180 [mlp]=180
                  [cross-entropy]=180 [generate]=180 [throughput]=390 [throughput-largest]=420 [profile]=180
                  [throughput-medium]=560)

STEPS=()
for arg in "${@:-env tests sanitizer kernels generate throughput throughput-largest profile throughput-medium}"; do
    for step in $arg; do
        case $step in
            sanitizer) STEPS+=(memcheck racecheck) ;;
            kernels) STEPS+=(attention layernorm mlp cross-entropy) ;;
            *) if [[ -v LIMIT[$step] ]]; then STEPS+=("$step"); else
                   echo "unknown step '$step'; steps: env tests sanitizer kernels generate throughput" \
                        "throughput-largest profile throughput-medium (or: memcheck racecheck attention layernorm" \
                        "mlp cross-entropy)"; exit 2; fi ;;
        esac
    done
done
ARCHIVE="gpu_run-$(IFS=_; echo "${STEPS[*]}").tar.gz"
SUMMARY=()
FAILED=0

save() {  # the results so far, packed into ARCHIVE_DIR when it is set
    [ -n "${ARCHIVE_DIR:-}" ] || return 0
    printf '%s\n' "${SUMMARY[@]}" >"$ARCHIVE_DIR/summary.txt"
    tar -czf "$ARCHIVE_DIR/$ARCHIVE" "$RESULTS"
}

for step in "${STEPS[@]}"; do
    log="$RESULTS/gpu_run-$step-$DEVICE.log"
    echo "=== $step (limit ${LIMIT[$step]} s), log in $log"
    started=$SECONDS
    { echo "# bash bench/gpu_run.sh $step, $(date -u +%FT%TZ), limit ${LIMIT[$step]} s"
      # SIGINT first, so that pytest and the benchmarks stop as after Ctrl-C, printing what they have.
      timeout -s INT -k 20 "${LIMIT[$step]}" bash -c "step_${step//-/_}"; } 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    echo "# exit status $rc" >>"$log"
    case $rc in
        0) verdict=PASS ;;
        "$SKIPPED") verdict=SKIPPED ;;
        124 | 137) verdict="TIMEOUT after ${LIMIT[$step]} s" ;;
        *) verdict="FAIL (exit status $rc)" ;;
    esac
    [[ $verdict == PASS || $verdict == SKIPPED ]] || FAILED=$((FAILED + 1))
    SUMMARY+=("$(printf '%-18s %-28s %4d s  %s' "$step" "$verdict" $((SECONDS - started)) "$log")")
    save
done

echo
echo "=== summary ($DEVICE)${ARCHIVE_DIR:+; $ARCHIVE_DIR holds $ARCHIVE and summary.txt}"
printf '%s\n' "${SUMMARY[@]}"
exit $((FAILED > 0))  # 1 when a step failed or ran out of time
