#!/usr/bin/env bash
# The one-command GPU run (see bench/README.md, and the workspace's shared/GPU.md outside the repo).
#
#   bash bench/gpu_run.sh [COMMIT] [STAGE ...]
#
# COMMIT: the full git commit hash of the checkout (the device machine receives the files, not the
# git history); default $FASTBERT_COMMIT, else `git rev-parse HEAD` where git works, else "unknown".
# STAGE:  info     GPU, driver, versions (nvidia-smi, python, torch, triton, nvcc)
#         install  python3 -m pip install --no-build-isolation --no-deps -e .  (with
#                  FASTBERT_BUILD_CUDA=1 and MAX_JOBS=16 when csrc/ has sources)
#         tests    the whole test suite compiled on the GPU (interpreter off, cuda tests included),
#                  in FASTBERT_TEST_SHARDS (default 7) parallel pytest processes
#         bench    fastbert bench --quick --out $OUT/bench, then bench/bench_overhead.py;
#                  FASTBERT_BENCH_ARGS adds arguments, e.g. "--op attention --op norms" in one call
#                  and "--op sparse --op bert" in the next when the quick run does not fit in one
#         all      all of the above (the default)
#         sanitize compute-sanitizer memcheck / racecheck / synccheck over every CUDA kernel
#                  (bench/sanitize_cuda.sh; not part of "all": run it as a call of its own)
# "tests" and "bench" alone also run info and install first (a fresh machine is bare; set
# FASTBERT_SKIP_INSTALL=1 to skip install on a machine where it already ran), so the two halves of a
# run that does not fit in one command are:
#   bash bench/gpu_run.sh <commit> tests      and      bash bench/gpu_run.sh <commit> bench
# Paths under tests/ (files or pytest node ids) narrow the tests stage to them, e.g. to re-run what
# failed: bash bench/gpu_run.sh <commit> tests tests/test_layer_norm.py tests/test_gelu.py
#
# Output under $OUT (default ./out): tests.log, bench.log (info and install go to the first of them),
# bench/results.json, bench/<family>.png and overhead.json: at most 8 files, 2 levels deep
# (results.csv is left out: `make_readme_table.py --import` rebuilds it from results.json).
# The whole run stays within FASTBERT_GPU_RUN_S seconds (default 540): every stage runs under
# `timeout`, and the benchmark is told its budget so that it stops starting cases in time and still
# writes its results. Exit code: the first failing stage's (124 = a stage ran out of time).
set -o pipefail
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
TOTAL_S="${FASTBERT_GPU_RUN_S:-540}"
START=$SECONDS

usage() {
    sed -n '2,/^set -o pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

COMMIT="${FASTBERT_COMMIT:-}"
STAGES=()
TEST_PATHS=()
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        tests/*) TEST_PATHS+=("$arg") ;;
        info|install|tests|bench|sanitize) STAGES+=("$arg") ;;
        all) STAGES+=(info install tests bench) ;;
        *)
            if [[ "$arg" =~ ^[0-9a-fA-F]{7,40}(-dirty)?$ ]]; then
                COMMIT="$arg"
            else
                echo "gpu_run.sh: unknown argument '$arg' (expected a commit hash or a stage)" >&2
                usage >&2
                exit 2
            fi ;;
    esac
done
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(info install tests bench)
[[ ${#TEST_PATHS[@]} -eq 0 ]] && TEST_PATHS=(tests)
has_stage() { local s; for s in "${STAGES[@]}"; do [[ "$s" == "$1" ]] && return 0; done; return 1; }
# tests and bench need an installed fastbert on a fresh machine
if has_stage tests || has_stage bench || has_stage sanitize; then
    has_stage install || [[ "${FASTBERT_SKIP_INSTALL:-0}" == 1 ]] || STAGES=(install "${STAGES[@]}")
    has_stage info || STAGES=(info "${STAGES[@]}")
fi
if [[ -z "$COMMIT" ]]; then
    COMMIT="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
fi

OUT="${OUT:-$REPO/out}"
mkdir -p "$OUT"
export FASTBERT_COMMIT="$COMMIT"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET            # compiled Triton kernels on the GPU, never the interpreter

if has_stage tests; then MAINLOG="$OUT/tests.log"; elif has_stage bench; then MAINLOG="$OUT/bench.log"; else MAINLOG="$OUT/sanitize.log"; fi

remaining() { echo $(( TOTAL_S - (SECONDS - START) )); }
# stage_limit CAP RESERVE: CAP seconds, but leave RESERVE seconds of the run's budget for later stages
stage_limit() {
    local cap=$1 reserve=$2 left
    left=$(( $(remaining) - reserve ))
    (( left < cap )) && cap=$left
    (( cap < 30 )) && cap=30
    echo "$cap"
}

log() { echo "$*" | tee -a "$MAINLOG"; }

FIRST_FAIL=0
record() {  # record STAGE RC SECONDS
    local stage=$1 rc=$2 took=$3
    if [[ $rc -eq 0 ]]; then
        log "== stage $stage: ok (${took} s)"
    else
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then
            log "== stage $stage: ran out of time after ${took} s (exit $rc); run it alone: bash bench/gpu_run.sh $COMMIT $stage"
        else
            log "== stage $stage: FAILED with exit code $rc (${took} s)"
        fi
        [[ $FIRST_FAIL -eq 0 ]] && FIRST_FAIL=$rc
    fi
}

stage_info() {
    {
        echo "== fastbert GPU run: commit $COMMIT, stages: ${STAGES[*]}, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        if command -v nvidia-smi >/dev/null 2>&1; then
            timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
                --format=csv || true
            timeout 30 nvidia-smi || true
        else
            echo "nvidia-smi: not found"
        fi
        command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
        timeout 120 "$PY" - <<'EOF'
import platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("torch sees NO CUDA GPU")
for name in ("transformers", "pytest", "pytest_benchmark", "matplotlib", "tqdm", "liger_kernel",
             "apex", "xformers", "flash_attn"):
    try:
        mod = __import__(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception:
        print(f"{name}: not installed")
EOF
    } 2>&1 | tee -a "$MAINLOG"
}

stage_install() {
    if [[ -n "$(find csrc -type f \( -name '*.cu' -o -name '*.cpp' \) 2>/dev/null | head -n 1)" ]]; then
        export FASTBERT_BUILD_CUDA=1
    else
        export FASTBERT_BUILD_CUDA=0
    fi
    local limit
    limit=$(stage_limit 420 240)
    log "== install (FASTBERT_BUILD_CUDA=$FASTBERT_BUILD_CUDA, MAX_JOBS=$MAX_JOBS, limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 \
        | tail -n 200 | tee -a "$MAINLOG" || return $?
    "$PY" -c "import fastbert, fastbert.backends as b; print('fastbert', fastbert.__version__, \
'from', fastbert.__file__, '| CUDA extension:', b.cuda_extension_error() or 'loaded')" 2>&1 \
        | tee -a "$MAINLOG"
}

stage_tests() {
    # The suite runs as FASTBERT_TEST_SHARDS (default 7) pytest processes in parallel on the one
    # GPU (tests/conftest.py splits the tests by function, balanced by count), then the `bigmem`
    # tests alone. On a fresh machine most of the time goes to Triton compiles, each single-threaded
    # on the CPU: counted under the interpreter, the suite launches well over a thousand distinct
    # kernel specialisations, so 7 shards of 2 threads each keep most of the 16 cores busy (7: their
    # logs and tests.log are the 8 files that come back from a run that is cut short). Each shard logs to
    # $OUT/shard<i>.log while it runs (kept if the run is cut short); the logs are then merged into
    # tests.log, preceded by each shard's summary line.
    local limit reserve=0 shards="${FASTBERT_TEST_SHARDS:-7}" i r rc=0 pids=()
    has_stage bench && reserve=240
    limit=$(stage_limit 540 "$reserve")
    local shard_limit=$(( limit - 60 ))
    (( shard_limit < 30 )) && shard_limit=30
    # The CPU emulation of the CUDA kernels (tests/test_cuda_emulated.py, minutes of CPU) is CI's
    # stand-in for this machine: here the kernels run for real.
    local args=("${TEST_PATHS[@]}" --ignore=tests/test_cuda_emulated.py -q -rs --durations=15 -p no:cacheprovider)
    log "== tests: $shards parallel shards of python3 -m pytest ${args[*]} (limit ${shard_limit} s), then -m bigmem"
    for (( i = 0; i < shards; i++ )); do
        FASTBERT_TEST_SHARD="$i/$shards" OMP_NUM_THREADS=2 \
            timeout --kill-after=10 "$shard_limit" "$PY" -m pytest "${args[@]}" \
            > "$OUT/shard$i.log" 2>&1 &
        pids+=($!)
    done
    for (( i = 0; i < shards; i++ )); do
        wait "${pids[$i]}"
        r=$?
        log "== shard $i/$shards: exit $r: $(tail -n 1 "$OUT/shard$i.log")"
        # 5: pytest collected nothing in this shard (possible when the paths are narrowed)
        (( r != 0 && r != 5 && rc == 0 )) && rc=$r
    done
    for (( i = 0; i < shards; i++ )); do
        { echo; echo "== shard $i/$shards log"; cat "$OUT/shard$i.log"; } >> "$OUT/tests.log"
        rm -f "$OUT/shard$i.log"
    done
    log "== tests: the bigmem tests, alone (python3 -m pytest ${TEST_PATHS[*]} -m bigmem)"
    timeout --kill-after=10 "$(stage_limit 120 "$reserve")" "$PY" -m pytest "${TEST_PATHS[@]}" -m bigmem \
        -q -rs -p no:cacheprovider 2>&1 | tee -a "$OUT/tests.log"
    r=${PIPESTATUS[0]}
    (( r != 0 && r != 5 && rc == 0 )) && rc=$r
    return "$rc"
}

stage_bench() {
    local limit run_limit budget cmd overhead extra
    limit=$(stage_limit 540 10)
    # the stage as a whole stays within limit: the bench gets limit - 70 s (bench_overhead.py,
    # ~30 s, gets <= 60 s after it), and stops starting cases 100 s before its own end (one case,
    # FlexAttention or a model's first compile included, then writing results and plots)
    run_limit=$(( limit - 70 ))
    (( run_limit < limit / 2 )) && run_limit=$(( limit / 2 ))
    budget=$(( run_limit - 100 ))
    (( budget < run_limit / 2 )) && budget=$(( run_limit / 2 ))
    # FASTBERT_BENCH_ARGS: more arguments for the bench, e.g. "--op attention --op norms" in one
    # device call and "--op sparse --op bert" in the next (the quick run may not finish in one)
    read -r -a extra <<< "${FASTBERT_BENCH_ARGS:-}"
    if "$PY" -m fastbert bench --help >/dev/null 2>&1; then
        cmd=("$PY" -m fastbert bench)
    else  # the CLI does not route `bench` in this checkout: the same runner, called directly
        cmd=("$PY" -m fastbert.benchmarks.runner)
    fi
    [[ "$MAINLOG" != "$OUT/bench.log" ]] && \
        echo "== fastbert GPU run: commit $COMMIT (versions: see tests.log)" >> "$OUT/bench.log"
    echo "== bench: ${cmd[*]} --quick ${extra[*]} --out $OUT/bench --budget-s $budget (limit ${run_limit} s)" \
        | tee -a "$OUT/bench.log"
    timeout --kill-after=10 "$run_limit" "${cmd[@]}" --quick "${extra[@]}" --out "$OUT/bench" \
        --budget-s "$budget" 2>&1 | tee -a "$OUT/bench.log"
    local rc=${PIPESTATUS[0]}
    # results.csv holds the rows of results.json: make_readme_table.py --import rebuilds it, and
    # leaving it out keeps $OUT within the 8 files the device tool brings back.
    rm -f "$OUT/bench/results.csv"
    overhead=$(( $(remaining) - 10 ))
    (( overhead > 60 )) && overhead=60
    if (( overhead >= 20 )); then
        echo "== bench: host cost per call (bench/bench_overhead.py, tiny shapes, ~30 s)" | tee -a "$OUT/bench.log"
        timeout --kill-after=10 "$overhead" "$PY" bench/bench_overhead.py --out "$OUT/overhead.json" 2>&1 \
            | tee -a "$OUT/bench.log"
    else
        echo "== bench: no time left for bench/bench_overhead.py (${overhead} s)" | tee -a "$OUT/bench.log"
    fi
    return "$rc"
}

stage_sanitize() {
    local limit
    limit=$(stage_limit 540 10)
    log "== sanitize: bench/sanitize_cuda.sh $OUT (limit ${limit} s)"
    timeout --kill-after=10 "$limit" bash bench/sanitize_cuda.sh "$OUT" 2>&1 | tail -n 100 | tee -a "$MAINLOG"
}

for stage in "${STAGES[@]}"; do
    t0=$SECONDS
    "stage_$stage"
    rc=$?
    record "$stage" "$rc" $(( SECONDS - t0 ))
    if [[ "$stage" == install && $rc -ne 0 ]]; then
        log "== install failed: the remaining stages run against the source tree as it is"
    fi
done

n_files=$(find "$OUT" -type f | wc -l)
log "== done in $(( SECONDS - START )) s, exit $FIRST_FAIL; $n_files files under \$OUT:"
find "$OUT" -type f | sed "s|^$OUT/|  |" | sort | tee -a "$MAINLOG"
if (( n_files > 8 )); then
    log "== WARNING: more than 8 files under \$OUT; the device tool brings back only 8"
fi
exit "$FIRST_FAIL"
