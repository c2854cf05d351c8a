#!/usr/bin/env bash
# The GPU session in one script: the environment, the whole test suite run natively, the kernels under
# compute-sanitizer, the four kernel benchmarks, the text-generation benchmark, the training-throughput benchmark
# (also at the largest micro-batch that fits, and under FSDP2) and a profile of one training step. Each step logs to
# bench/results/gpu_run-<step>-<device>.log and runs under its own time limit; a step that fails or runs out of time is
# recorded and the next one runs. A summary of the steps comes last.
#
#   bash bench/gpu_run.sh quick     the most important answers first, in at most 8 minutes on an H100 with cold
#                                   caches (below)
#   bash bench/gpu_run.sh STEP...   env tests sanitizer (= memcheck racecheck) kernels (= attention layernorm mlp
#                                   cross-entropy) generate throughput throughput-largest throughput-fsdp profile
#                                   throughput-medium host-overhead; none: all of them (about 47 min on an H100)
#
# quick runs, in this order: env; tests-gpu, the GPU-marked tests (are the kernels right on this hardware, in bf16);
# throughput-quick, GPT-2 124M training steps as nanoGPT runs them (SDPA + torch.compile) against every op on Triton,
# with and without torch.compile; attention-quick, layernorm-quick, mlp-quick, cross-entropy-quick, each kernel at its
# headline shape against its peers; repeatability, two processes' losses bitwise equal over 10 steps. Each step's limit
# is its budget, estimated from its compile and autotune counts and its steps, and each step's results are written as
# soon as they exist. On a machine without a GPU, quick (or any of its steps alone) is a dry run: each step checks its
# command (imports, arguments; the tests are collected) and reports itself skipped with its budget, the budgets' sum
# comes last, and it exits 0, or 1 if a step's command fails.
#
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

link_package() {  # the installed layout (pyproject.toml's package-dir) as links on PYTHONPATH, where pip cannot install
    local root
    root=$(mktemp -d)
    mkdir "$root/tritongpt"
    ln -s "$PWD"/tritongpt/*.py "$root/tritongpt/"
    for sub in kernels model data; do ln -s "$PWD/$sub" "$root/tritongpt/$sub"; done
    export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
}

if ! "$PY" -c "import tritongpt.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3 || true
    if ! "$PY" -c "import tritongpt.kernels" 2>/dev/null; then
        echo "pip could not install the project here: importing it from links instead"
        link_package
        "$PY" -c "import tritongpt.kernels" || { echo "cannot import the project"; exit 2; }
    fi
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
step_tests_gpu() {
    if [ -n "${DRY_RUN:-}" ]; then "$PY" -m pytest -m gpu -q --collect-only -p no:cacheprovider | tail -n 1; return; fi
    # The tests run in 8 processes (pytest-xdist, where installed), since compiling their ~180 kernel variants one at a
    # time would take most of the budget. Their autotuners time configs while sharing the GPU, so they tune in a Triton
    # cache of their own; the kernels they compiled, without those choices, then join the cache the later steps use.
    local own main=${TRITON_CACHE_DIR:-$HOME/.triton/cache} parallel=() rc
    own=$(mktemp -d)
    "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
    TRITON_CACHE_DIR=$own "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --durations=10 "${parallel[@]}"
    rc=$?
    find "$own" -name '*.autotune.json' -delete
    mkdir -p "$main" && cp -r "$own"/. "$main"/  # entries are named by their contents' hash: nothing is replaced
    rm -rf "$own"
    return $rc
}
step_throughput_quick() { "$PY" -m bench.train_throughput --quick ${DRY_RUN:+--dry-run}; }
step_attention_quick() { "$PY" -m bench.bench_attention --quick ${DRY_RUN:+--dry-run}; }
step_layernorm_quick() { "$PY" -m bench.bench_layernorm --quick ${DRY_RUN:+--dry-run}; }
step_mlp_quick() { "$PY" -m bench.bench_mlp --quick ${DRY_RUN:+--dry-run}; }
step_cross_entropy_quick() { "$PY" -m bench.bench_linear_cross_entropy --quick ${DRY_RUN:+--dry-run}; }
step_repeatability() { "$PY" -m bench.repeatability ${DRY_RUN:+--dry-run}; }
step_host_overhead() { "$PY" -m bench.host_overhead; }
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
step_throughput_fsdp() { "$PY" -m bench.train_throughput --models gpt2 --parallel fsdp; }
step_throughput_medium() { "$PY" -m bench.train_throughput --models gpt2-medium; }
step_profile() { "$PY" -m bench.profile_step --model gpt2 --variant c,b ${ARCHIVE_DIR:+--trace "$ARCHIVE_DIR"}; }
export -f step_env sanitizer_path sanitize step_tests step_memcheck step_racecheck step_attention step_layernorm \
    step_mlp step_cross_entropy step_generate step_throughput step_throughput_largest step_throughput_fsdp \
    step_throughput_medium step_profile step_tests_gpu step_throughput_quick step_attention_quick step_layernorm_quick step_mlp_quick \
    step_cross_entropy_quick step_repeatability step_host_overhead

declare -A LIMIT=([env]=20 [tests]=330 [memcheck]=110 [racecheck]=90 [attention]=180 [layernorm]=180 [mlp]=180
                  [cross-entropy]=180 [generate]=180 [throughput]=390 [throughput-largest]=420 [throughput-fsdp]=390
                  [profile]=180
                  [throughput-medium]=560 [host-overhead]=90)
# quick's budgets, in seconds (450 in all, with ~20 s for the script's own start in an 8-minute session), each about
# 1.3x what it took on an H100 (HBM3, 80 GB) with cold caches: tests-gpu ~180 compiles in 8 processes and 60 tests,
# 66 s; throughput-quick two cold torch.compile runs of GPT-2 (27 s for nanoGPT's) and 8 steps a variant; the kernels
# one compile per compiled peer and ~2 s of timing per peer and pass, 14-29 s (LayerNorm's the most: torch.compile and
# Liger-Kernel beside it); repeatability two processes starting PyTorch and GPT-2 for 10 steps, 28 s.
LIMIT+=([tests-gpu]=90 [throughput-quick]=170 [attention-quick]=25 [layernorm-quick]=45 [mlp-quick]=35
        [cross-entropy-quick]=30 [repeatability]=35)
QUICK="env tests-gpu throughput-quick attention-quick layernorm-quick mlp-quick cross-entropy-quick repeatability"

STEPS=()
for arg in "${@:-env tests sanitizer kernels generate throughput throughput-largest throughput-fsdp profile \
              throughput-medium host-overhead}"; do
    for step in $arg; do
        case $step in
            quick) STEPS+=($QUICK) ;;
            sanitizer) STEPS+=(memcheck racecheck) ;;
            kernels) STEPS+=(attention layernorm mlp cross-entropy) ;;
            *) if [[ -v LIMIT[$step] ]]; then STEPS+=("$step"); else
                   echo "unknown step '$step'; steps: quick env tests sanitizer kernels generate throughput" \
                        "throughput-largest throughput-fsdp profile throughput-medium host-overhead (or: memcheck" \
                        "racecheck attention layernorm mlp cross-entropy, and quick's: $QUICK)"; exit 2; fi ;;
        esac
    done
done

only_quick=1
for step in "${STEPS[@]}"; do [[ " $QUICK " == *" $step "* ]] || only_quick=; done
if [ -n "$only_quick" ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "no CUDA GPU here: a dry run, in which each step checks its command and is skipped"
    total=0 broken=0
    for step in "${STEPS[@]}"; do
        total=$((total + LIMIT[$step]))
        echo "=== $step: skipped (no GPU), budget ${LIMIT[$step]} s"
        [ "$step" = env ] && continue  # nvidia-smi and versions: nothing to check without a GPU
        DRY_RUN=1 bash -c "step_${step//-/_}" 2>&1 | sed 's/^/    /'
        [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "    BROKEN: the step's command fails"; broken=$((broken + 1)); }
    done
    [ "$broken" -eq 0 ] || echo "=== $broken step(s) BROKEN: their commands fail (above)"
    echo "=== budgets' sum: $total s for ${#STEPS[@]} steps"
    exit $((broken > 0))
fi

mkdir -p "$RESULTS"
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
echo "=== summary ($DEVICE, $SECONDS s in all)${ARCHIVE_DIR:+; $ARCHIVE_DIR holds $ARCHIVE and summary.txt}"
printf '%s\n' "${SUMMARY[@]}"
exit $((FAILED > 0))  # 1 when a step failed or ran out of time
