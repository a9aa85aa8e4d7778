#!/usr/bin/env bash
# Run every benchmark in sequence; all output also goes to a results file (markdown tables inside).
#
#   bash bench/run_all.sh                 # the full figures (tens of minutes on 2 cores: use a quiet machine)
#   bash bench/run_all.sh --quick         # smoke test of every script (a couple of minutes, figures meaningless)
#   DEVICE=cuda bash bench/run_all.sh     # network and training benches on the GPU (fp16)
#   OUT=path.md bash bench/run_all.sh     # where the output goes (default bench/results.md, --quick: /tmp)
#
# A failing bench is reported and the others still run; the exit code is 1 when any failed.
set -u -o pipefail
cd "$(dirname "$0")/.."

QUICK=()
if [[ "${1:-}" == "--quick" ]]; then QUICK=(--quick); fi
DEVICE=${DEVICE:-cpu}
PY=${PYTHON:-python}
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
if [[ ${#QUICK[@]} -gt 0 ]]; then
    OUT=${OUT:-/tmp/star_bench_results_quick.md}
    # The quick inference job: 2 short videos in their own folder (videos are cached by name).
    JOB=(--work_dir /tmp/star_bench_quick --videos 2 --frames 20)
else
    OUT=${OUT:-bench/results.md}
    JOB=(--work_dir /tmp/star_bench --warmup 1 --repeats 3)
fi

failed=()
step() {   # step NAME COMMAND...: run one bench, note a failure, go on
    local name=$1; shift
    echo
    echo "## $name"
    echo '```'
    echo "\$ $*"
    echo '```'
    local start=$SECONDS
    "$@"
    local rc=$?
    echo
    echo "($name: exit code $rc, $((SECONDS - start)) s)"
    [[ $rc -eq 0 ]] || failed+=("$name")
}

{
    echo "# STAR benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname)${QUICK:+ (QUICK: figures meaningless)}"
    step network "$PY" bench/bench_network.py --device "$DEVICE" "${QUICK[@]}"
    step inference "$PY" bench/inference_job.py "${JOB[@]}"
    step sampling "$PY" bench/bench_sampling.py "${QUICK[@]}"
    step training "$PY" bench/bench_training.py --device "$DEVICE" "${QUICK[@]}"
    step deploy "$PY" bench/bench_deploy.py "${QUICK[@]}"
    step stream "$PY" bench/bench_stream.py "${QUICK[@]}"
    step loading "$PY" bench/bench_loading.py "${QUICK[@]}"
    if [[ ${#QUICK[@]} -gt 0 ]]; then
        step epoch "$PY" bench/bench_epoch.py --quick
    else
        step epoch "$PY" bench/bench_epoch.py --sample   # the tester's command: ~20 min on 2 cores with native bf16
    fi
    if [[ ${#QUICK[@]} -gt 0 ]]; then   # the dataset suite, one tiny variant, 1 epoch: checks the script
        step suite "$PY" bench/bench_suite.py --quick --variants people_base --num_videos 8 --num_unseen 4 \
            --main_args "--epochs 1 --decoder_steps 10" --fresh --data_dir /tmp/star_bench_quick/suite_data \
            --work_dir /tmp/star_bench_quick/suite
    else   # one variant on the quick schedule; the whole suite takes hours: python bench/bench_suite.py
        step suite "$PY" bench/bench_suite.py --quick --variants people_base --fresh
    fi
    echo
    if [[ ${#failed[@]} -gt 0 ]]; then echo "FAILED: ${failed[*]}"; else echo "all benches ran"; fi
    [[ ${#failed[@]} -eq 0 ]]
} 2>&1 | tee "$OUT"
rc=${PIPESTATUS[0]}
echo "output written to $OUT"
exit "$rc"
