#!/usr/bin/env bash
# The benchmark suite of BENCHMARKS.md on one GPU, at real shapes with random weights, each script with the
# transformers peer (--peer hf) and the copy-bandwidth ceiling. Writes one JSON per benchmark, the server
# logs and log.txt under $OUT, and prints a summary table last.
#
#   OUT=/path/to/out WEIR_COMMIT=$(git rev-parse HEAD) bash loadtest/run_gpu_suite.sh
#
# Run from the repository root. If ./.whl holds the wheels of ../shared/scripts/device-wheels.sh (the
# server's dependencies), they are installed into /tmp/site first. Last, loadtest/plot_suite.py draws
# $OUT/suite.png when matplotlib imports (skipped with a message when it does not).
# Most important first (T1, L1, T2, S1, U1, P1), each under `timeout`, all within SUITE_BUDGET seconds;
# a benchmark that no longer fits is skipped and named at the end. Knobs (environment):
#   BENCHES="T1 L1 T2 S1 U1 P1"   which to run, in this order (add K for the kernel profile of T2's
#                                 steps, loadtest/profile_kernels.py; B for beam search and parallel
#                                 sampling B1-B3, loadtest/bench_beam.py; A for multi-LoRA A1-A4,
#                                 loadtest/bench_lora.py; Q for quantization Q1-Q5,
#                                 loadtest/bench_quant.py: GPTQ/AWQ/FP8 weights and the FP8 KV cache vs bf16)
#                                 K1: L1's batch-1 decode step part by part (loadtest/decode_breakdown.py)
#   SUITE_BUDGET=550              seconds for the whole suite
#   T2_REQUESTS=1000              T2's and S1's request count (S1's ratio needs the same workload)
#   S1_POISSON_REQUESTS=240       requests sent at 16 req/s (the first N of T2's)
#   PEERS=hf                      T1's and T2's peers: hf (generate()), hf-cb (transformers' continuous
#                                 batching, loadtest/hf_cb_peer.py) or hf,hf-cb (T1/T2 caps grow by CB_EXTRA_S)
#   HF_CB_VARIANTS=tuned          tuned (the --hf-cb-* defaults) and/or defaults (the library's own)
#   HF_CB_MAX_REQUESTS=           run the CB peer on the first N requests only (default: all)
#   HF_CB_TIME_LIMIT=150          seconds for the CB peer's measured run; its figures then count the
#                                 requests finished by then (the JSON says how many)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
BENCHES="${BENCHES:-T1 L1 T2 S1 U1 P1}"
SUITE_BUDGET="${SUITE_BUDGET:-550}"
T2_REQUESTS="${T2_REQUESTS:-1000}"
Q_T2_REQUESTS="${Q_T2_REQUESTS:-500}"   # Q3/Q4's T2 workload: three engines in Q's 560 s
S1_POISSON_REQUESTS="${S1_POISSON_REQUESTS:-240}"
PY="${PYTHON:-python3}"
PEERS="${PEERS:-hf}"
HF_CB_VARIANTS="${HF_CB_VARIANTS:-tuned}"
CB_EXTRA_S=0
CB_ARGS=()
if [[ "$PEERS" == *hf-cb* ]]; then
  CB_EXTRA_S="${CB_EXTRA_S_OVERRIDE:-240}"
  CB_ARGS=(--hf-cb-variants "$HF_CB_VARIANTS" --hf-cb-time-limit "${HF_CB_TIME_LIMIT:-150}"
           ${HF_CB_MAX_REQUESTS:+--hf-cb-max-requests "$HF_CB_MAX_REQUESTS"})
fi

suite() {
  local start=$SECONDS skipped="" failed=""
  echo "== weir GPU suite: $BENCHES (budget ${SUITE_BUDGET}s) commit=${WEIR_COMMIT:-?} $(date -u +%FT%TZ)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "!! wheel install failed: S1 and U1 (the server) will fail"
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

  # run NAME CAP_SECONDS ARGS...: the script under `timeout`, capped by what is left of the budget.
  run() {
    local name=$1 cap=$2; shift 2
    local left=$((SUITE_BUDGET - (SECONDS - start) - 10))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 45 ]; then
      echo "== $name: skipped (${left}s left of the budget)"; skipped="$skipped $name"; return
    fi
    echo "== $name: up to ${limit}s: $*"
    local t0=$SECONDS rc=0
    timeout -k 20 "$limit" "$PY" "$@" || rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || failed="$failed $name($rc)"
  }

  for b in $BENCHES; do
    case $b in
      T1) run T1 $((150 + CB_EXTRA_S)) loadtest/bench_throughput.py --workload t1 --shape qwen3-0.6b \
            --peer "$PEERS" --peer-max-steps 128 "${CB_ARGS[@]}" --out "$OUT/t1.json" ;;
      L1) run L1 120 loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 \
            --peer hf --peer-max-steps 48 --out "$OUT/l1.json" ;;
      T2) run T2 $((180 + CB_EXTRA_S)) loadtest/bench_throughput.py --workload t2 --shape llama3-8b \
            --num-requests "$T2_REQUESTS" --peer "$PEERS" --peer-max-requests 128 --peer-max-steps 48 \
            "${CB_ARGS[@]}" --out "$OUT/t2.json" ;;
      S1) run S1 220 loadtest/bench_serving.py --shape llama3-8b --num-requests "$T2_REQUESTS" \
            --request-rates inf,16 --num-requests-finite-rate "$S1_POISSON_REQUESTS" \
            --offline-json "$OUT/t2.json" --peer hf --server-log "$OUT/server_s1.log" --out "$OUT/s1.json" ;;
      U1) run U1 120 loadtest/bench_startup.py --shape llama3-8b --peer hf \
            --server-log "$OUT/server_u1.log" --out "$OUT/u1.json" ;;
      P1) run P1 150 loadtest/bench_prefix.py --shape llama3-8b \
            --peer hf --peer-max-requests 16 --peer-max-steps 16 --out "$OUT/p1.json" ;;
      B) run B 300 loadtest/bench_beam.py --shape llama3-8b \
            --peer hf --peer-max-requests 8 --peer-max-steps 16 --out "$OUT/b.json" ;;
      A) run A 560 loadtest/bench_lora.py --shape llama3-8b --out "$OUT/a.json" ;;
      Q) run Q 560 loadtest/bench_quant.py --shape llama3-8b --t2-requests "$Q_T2_REQUESTS" \
            --out "$OUT/q.json" ;;
      K) run K 120 loadtest/profile_kernels.py --shape llama3-8b --num-requests 640 \
            --out "$OUT/profile_t2.json" ;;
      K1) run K1 120 loadtest/profile_kernels.py --mode batch1 --shape llama3-8b --input-len 32 \
            --output-len 256 --decode-steps 20 --out "$OUT/profile_l1.json" ;;
      *) echo "== unknown benchmark $b" ;;
    esac
  done

  echo
  echo "== summary (${SECONDS}s in all; skipped:${skipped:- none}; failed:${failed:- none})"
  "$PY" loadtest/summary.py "$OUT"
  if "$PY" -c "import matplotlib" 2>/dev/null; then
    "$PY" loadtest/plot_suite.py "$OUT" || echo "!! plot failed"
  else
    echo "== plot: skipped (matplotlib is not installed here; later: python loadtest/plot_suite.py OUT_DIR)"
  fi
}

suite 2>&1 | tee "$OUT/log.txt"
