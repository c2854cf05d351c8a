#!/usr/bin/env bash
# The GPU session in one script: the environment, the whole test suite run natively, the kernels under
# compute-sanitizer, the three kernel benchmarks, the training-throughput benchmark and a profile of one training
# step. Each step logs to bench/results/gpu_run-<step>-<device>.log and runs under its own time limit; a step that
# fails or runs out of time is recorded and the next one runs. A summary of the steps comes last.
#
#   bash bench/gpu_run.sh STEP...   env tests sanitizer (= memcheck racecheck) kernels (= attention layernorm mlp)
#                                   throughput profile throughput-medium; none: all (~30 min, over one call's limit)
#
# With the device tool: one call runs at most 10 minutes and a session has 30 minutes of device time, the machine's
# start (1-2 min) included. Make the calls back to back: the machine goes back 30 s after a call, and the next call
# then starts a fresh one (and loses the Triton and Inductor caches). Estimates for an H100 (none measured yet):
#   run(command="bash bench/gpu_run.sh env tests sanitizer", timeout_s=600)    ~7 min; limits 30+330+110+90 s
#   run(command="bash bench/gpu_run.sh kernels", timeout_s=600)                ~7 min; limits 3 x 180 s
#   run(command="bash bench/gpu_run.sh throughput profile", timeout_s=600)     ~7 min; limits 390+180 s
#   run(command="bash bench/gpu_run.sh throughput-medium", timeout_s=600)      ~6 min; only if status shows 8+ min left
# Each call leaves in $OUT: gpu_run-<steps>.tar.gz (all of bench/results/: the logs, the JSON, profile-*.md; packed
# again after every step, so a call cut short still brings back what finished), summary.txt, and from the profile
# step the chrome traces trace-<variant>-<device>.json.gz (to look at, not to commit). Then, here, at the repository
# root: tar -xzf <files_at>/gpu_run-<steps>.tar.gz, and bench/results/ holds what to commit.
#
# Liger-Kernel (optional: bench_layernorm compares against it when it imports) is not on the GPU image. To have it,
# download its wheel here once, as /work/.library/device/README.md says (.whl/ is git-ignored already; liger-kernel
# is pure Python and needs only torch and triton, which the image has):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5
# and add carry=[".whl"] to the kernels call: this script installs .whl/*.whl into /tmp/site when it finds them.
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
[ -n "${OUT:-}" ] && export OUT  # the profile step's traces go there
mkdir -p "$RESULTS"

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
    # Other engineers edit the kernels while results are pending: these hashes say which code was measured.
    sha256sum kernels/*.py model/*.py bench/*.py
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
step_throughput() { "$PY" -m bench.train_throughput --models gpt2; }
step_throughput_medium() { "$PY" -m bench.train_throughput --models gpt2-medium; }
step_profile() { "$PY" -m bench.profile_step --model gpt2 --variant c,b ${OUT:+--trace "$OUT"}; }
export -f step_env sanitizer_path sanitize step_tests step_memcheck step_racecheck step_attention step_layernorm \
    step_mlp step_throughput step_throughput_medium step_profile

declare -A LIMIT=([env]=30 [tests]=330 [memcheck]=110 [racecheck]=90 [attention]=180 [layernorm]=180 [mlp]=180
                  [throughput]=390 [profile]=180 [throughput-medium]=560)

STEPS=()
for arg in "${@:-env tests sanitizer kernels throughput profile throughput-medium}"; do
    for step in $arg; do
        case $step in
            sanitizer) STEPS+=(memcheck racecheck) ;;
            kernels) STEPS+=(attention layernorm mlp) ;;
            *) if [[ -v LIMIT[$step] ]]; then STEPS+=("$step"); else
                   echo "unknown step '$step'; steps: env tests sanitizer kernels throughput profile" \
                        "throughput-medium (or: memcheck racecheck attention layernorm mlp)"; exit 2; fi ;;
        esac
    done
done
ARCHIVE="gpu_run-$(IFS=_; echo "${STEPS[*]}").tar.gz"
SUMMARY=()
FAILED=0

save() {  # what the device tool brings back: only what lies under $OUT
    [ -n "${OUT:-}" ] || return 0
    printf '%s\n' "${SUMMARY[@]}" >"$OUT/summary.txt"
    tar -czf "$OUT/$ARCHIVE" "$RESULTS"
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
echo "=== summary ($DEVICE)${OUT:+; \$OUT holds $ARCHIVE and summary.txt}"
printf '%s\n' "${SUMMARY[@]}"
exit $((FAILED > 0))  # 1 when a step failed or ran out of time
