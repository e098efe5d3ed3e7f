#!/usr/bin/env bash
# One device call of several steps, for the lent GPU machine (its `run` tool returns at most 8 files and
# runs one command of at most 10 minutes): each step under `timeout`, capped by what is left of
# DEADLINE (seconds, default 560), every output under /tmp/o, tarred last to $OUT/r.tgz (one file back).
#
#   git rev-parse --short HEAD > .commit        # on this machine, before the call
#   STEPS="suite lora sweep" bash loadtest/device_call.sh   # the run's command (carry: .whl, .commit)
#
# Steps (knobs in the environment): suite (run_gpu_suite.sh; BENCHES, SB = its budget), feat
# (gpu_feature_check.py; FEAT_PARTS), eng (gpu_engine_check.py; ENG_PARTS), pyt (pytest on CUDA; PYT),
# l1, s16 (S1 at 16 req/s), u1, u1cold (U1 on an empty Triton cache), trace (trace_compiles.py), sampler (bench_sampler.py), beam (B1-B3), lora (A1-A4; LORA_COUNTS), k1lora (A3's step by kernel),
# cb (T1 with the transformers continuous-batching peer; CBB, CBN), cbng (the same, its CUDA graphs off; CBV, CBT), sweep (sweep_lora_gemv.py; SWT its options, SWC the cap), sweepseg (sweep_lora_segments.py), profbase and
# proflora (a T2-like decode step by kernel family, base / with PROF_ADAPTERS rank-16 adapters), proffp8 (the same with
# FP8 weights), k1 (L1's batch-1 step by kernel), gemv (sweep_gemv.py; GB batches, GK kinds, GX more options, GC cap), probe (probe_w4_layout.py), kern (gpu_kernel_check.py's KPARTS, default correctness and CUDA graphs), q12 (Q1, Q2); any
# other word is run as a shell command. pdl0a pdl1a pdl0b ...: L1 with WEIR_PDL=0 / 1 (ops/triton/pdl.py);
# u1coldcp / u1cp / tracecp / engcp: U1 on an empty / the machine's Triton cache, trace_compiles.py, the engine check
# (on an empty cache: ~3x the warm check, 111 of 114 checks in 287 s on an H100), each with WEIR_COMPILE_WORKERS=${CPW:-8} (engine/worker/compile_pool.py); u1rw / engrw: U1 and
# the engine check with WEIR_GRAPH_WARMUPS=representative (engine/worker/cuda_graphs.py); u1coldcprw: both on an empty cache;
# coldn1 coldo1 coldn2 ...: U1 on an empty Triton cache of its own by this tree and by ab_old/ (an A/B on the defaults);
# s1x: T2 then S1 at rate inf three times against it (issue 17: every run >= 0.97); k8: K1 for L1's batch-8 step;
# u1m1 u1m2 ...: U1 by the defaults, all sharing one Triton cache that starts empty in the call (cold, then warm with the start-up marker);
# skin: sweep_gemv.py's skinny GEMM (ops/triton/skinny_gemm.py) at SKB tokens, its winning launches to
# $O/skinny_launches.json; sk0a sk1a sk0b ...: L1 with WEIR_SKINNY_GEMM=0 / 1 on those launches (after skin; else
# the built-in table); engsk: the engine check with it on and a launch for every shape (float32: exact); k1s / k8s: K1 /
# K8 with it on; fsk: sweep_gemv.py's FP8 GEMV and the skinny GEMM on FP8 weights (fp8_skinny) at FSB tokens (Q2's
# batch-1 projections: does the tensor-core W8A16 read FP8 weights faster?); grs0a grs1a grs0b ...: K1 with it off / on, also each of GRS's decode graphs replayed alone
# (graph_replay_ms_by_size: does the skinny GEMM's batch-1 cost reach every graph size?); t2s0a t2s1a ...: T2 with it off / on (T2SN requests); f8l0a f8l1a ...: L1 on FP8 weights with WEIR_FP8_SKINNY_GEMM=0 / 1 (fp8.py's skinny GEMM at 3-16 tokens); prb0 / prb1: probe_carveout.py with WEIR_SKINNY_GEMM=0 / 1 (decode graphs timed after launches that may set the SMs' L1/shared split), prb0big / prb048: with a skinny GEMM (~200 KB / 12 KB of shared memory) launched before the engine is built, prb0bg / prb0sg / prb0fg / prb0cg: a CUDA graph of the big one / the 12 KB one / an FP8 one (72 KB) / cuBLAS at 8 rows made before it and kept, prb0al: the same tensors kept, no launch (placement alone); pab0ACTION / pab1ACTION: probe_carveout.py --after-build ACTION (stream, segment, empty_cache, graph_engine_stream, graph, none) with WEIR_SKINNY_GEMM=0 / 1; pws0 / pws1: probe_carveout.py --warm-up-stream default (the engine's warm-ups on the default stream); ptr0 / ptr1: probe_carveout.py --trace-streams (which streams the build launched Triton kernels on); pmc0ACTION / pmc1ACTION: the same with CUDA_DEVICE_MAX_CONNECTIONS=${PMC:-32}; a trailing q (prb0q, prb0bgq) builds the engine on FP8 weights (is the FP8 engine's batch-1 graph, which its own skinny graphs did not slow, slowed by a bf16 one?); s48: the skinny sweep's small tiles under 48 KB of shared memory, winners to $O/skinny_48kb.json;
# sm1a sm1b ...: L1 with those (after s48); sl1a sl1b ...: L1 with it on, each layer's best launch of at most 100 KB of shared memory;
# sq80a sq81a sq80b ...: Q1 and Q2 at L1's batch SQB (default 8) by ab_old/ (0) and this tree (1), alternating; sb80a sb81a
# ...: L1 with WEIR_SKINNY_GEMM=1 the same way; t2ab0a t2ab1a ...: T2 (T2PN requests) the same way (an A/B of a change to the skinny GEMMs: their PDL, d9706b1 against later).
# engpdl: the engine check with WEIR_PDL=1 (the default since b7c78b5); fda0a fda1a fda0b ...: L1 with WEIR_FUSED_DECODE_ATTENTION=0 / 1
# (decode_attention, engine/model/layers/attention.py); engfda: the engine check with it on; q12fda: Q1, Q2 with it on; q3: bench_quant.py's Q3 (T2 bf16 and FP8 weights);
# peer4: loadtest/peer_w4_gemv.py (Q5's peer: weir's W4A16 GEMV against GemLite's on the same weights, P4B tokens, weir's launch also
# under the P4R register caps, P4V: a JSON list of launches for --variants; needs gemlite's wheel in .whl: `pip wheel --no-deps gemlite -w .whl`).
# tiny: loadtest/probe_tinygemm.py (torch's own int4 kernel, _weight_int4pack_mm, against weir's W4A16 launches at TYB tokens).
# stalls: loadtest/probe_gemv_stalls.py (CUPTI PC sampling through Triton's proton: where the one-token W4A16 and FP8 GEMVs' warps
# stall, by source line; STL layers, STK kinds) -> $O/stalls/.
# featd: the feature check's quantized checkpoints (part d) alone; featd8: the same decoding 8 prompts (batch 8 against featd's 4).
# q1k0a q1k1a q1k0b ...: Q1 (Q1M formats) at L1 batch Q1B (default 8) with WEIR_W4_SKINNY_GEMM=0 / 1 (ops/triton/w4_skinny_gemm.py), alternating; q1u0a q1u1a ...: the same at batch 1. q12moe: Q1 (GPTQ W4A16 experts; Q1M: formats) and Q2 (FP8 experts) at the Qwen3-30B-A3B shape, batch-1 ITL vs bf16 in one call; q12moe8 / q12b8: Q1 and Q2 at L1's batch 8 (MoE shape / Llama-3-8B). q2moe0 / q2moe1: its Q2 with WEIR_MOE_FP8_GEMV=0 / 1 (FP8 experts at decode on the grouped GEMM / the GEMVs). fp8mm: probe_fp8_gemm.py (fp8mmb: again, to fp8_gemmb.json; Q3's FP8 GEMMs at prefill and
# decode row counts: row-wise scales as weir runs them, tensor-wise, fast accumulation, against bf16; FMR rows); q3fa: Q3
# with WEIR_FP8_FAST_ACCUM=1 (Q3N requests; compare with q3 in the same call). fp8kv: gpu_kernel_check.py's fp8 KV part (the widened
# read, ops/triton/fp8_kv_read.py, against the bytes path and a bf16 cache: checks and decode times); featew: the
# feature check's FP8 KV part (e) with WEIR_FP8_KV_WIDEN=1; q34w: bench_quant.py's Q3, Q4 and Q3KV with it (Q34N requests).
# q1m0a q1m1a q1m0b ...: Q1 (Q1M formats, default gptq) with WEIR_W4_META_2D=0 / 1 (the folded W4A16 GEMV's
# scales and zeros in its word tiles' layout), alternating.
# engm: the engine check with it on. q1c0a q1c1a q1c0b ...: Q1 with WEIR_W4_COL_BLOCKED=0 / 1 (the one-token folded
# GEMV on a column-blocked copy of the words), alternating; engc: the engine check with it on. q2p0a q2p1a ...: Q2
# with WEIR_FP8_GEMV_PIPELINE=0 / 1 (the one-token FP8 GEMV's tile loads pipelined by Triton, 3 stages), alternating.
# t2f0a t2f1a t2f0b ...: T2 with WEIR_FLASH_PREFILL=0 / 1 (whole prompts by torch's flash attention, ops/flash_prefill.py;
# T2FN requests), alternating; q3f: Q3 with it on (compare with q3 in the same call); engf: the engine check with it on
# for every prompt (WEIR_FLASH_PREFILL_MIN_TOKENS=1); `kern` with KPARTS=flash: its kernel check (loadtest/kernel_check_flash.py).
# q1p0a q1p1a q1p0b ...: Q1 and Q2 with WEIR_L2_PREFETCH=0 / 1 (ops/triton/l2_prefetch.py), alternating; l1p0a l1p1a ...:
# L1 (bf16) the same way; featdp: the feature check's quantized checkpoints (d) with it on; engl2p: the engine check with
# it on. pt1 / pt2: T1's typical decode step (Qwen3-0.6B, 144 sequences of ~840 positions) / T2's (Llama-3-8B, 256 of
# ~1,100) by kernel family (profile_kernels.py); `kern` with KPARTS=shapes: decode attention's launch swept at those
# shapes (gpu_kernel_check.py). ds00a ds10a ds11a ... / dt00a ...: T1 / T2 with WEIR_DECODE_TWO_STAGES and
# WEIR_DECODE_WIDE_TILE set to the name's two digits; pytds: the attention kernel tests on CUDA with both on. p1: P1
# (bench_prefix.py, no peer: its queued run's step times and first-token times). t1prof: T1, then T1 again under cProfile (the host's top functions; T1PN of them). t1k0a t1k1a ...: T1 with a bf16 / an fp8 KV cache (Q4's T1 figure; the fp8 read widened unless T1KW=0).
# abold1 abnew1 abold2 ...: L1 alternating an older tree and this one in one call (machines differ by up to 4%; compare within a call): first, on this machine,
# `mkdir ab_old && git archive REV engine ops app loadtest pyproject.toml | tar x -C ab_old`, carry ab_old. .whl holds the server's wheels: `../shared/scripts/device-wheels.sh httptools` (httptools: the bounded HTTP protocol, app/http_protocol.py; without it U1 and every server step exit after "engine ready").
# traa traz trab ...: T2 with the admission reserve at its default / 0 (vLLM's policy), alternating; q3a q3z ...: Q3 likewise.
# diag: loadtest/diagnose_divergence.py on DIAGF (DIAGX: more options, e.g. --layers; default gemma2: the engine check's tiny gemma2 left transformers' tokens
# at (3, 8) on an H100 at 2d0586f; each op in turn back on torch tells which kernel moves its logits) -> $O/diag_$DIAGF.json.
# The MoE / Phi-3 / Gemma / sliding-window families (first run on an H100 at 98de842), most important first; all five in one call:
#   STEPS="famk moek fam moet2 moel1" DEADLINE=580 bash loadtest/device_call.sh   (estimated, not measured: ~60 + 150 +
#   240 + 150 + 100 s at the caps; what the deadline cuts runs in a second call, e.g. STEPS="moet2 moel1"):
# famk: gpu_kernel_check.py's families part (windowed + softcapped attention at Gemma-2-9B's head_dim 256 past the window,
# Gemma 3's and Mistral's windows, the fused decode, a graph replay; Phi-4-mini's partial rotary; Gemma RMSNorm and GeGLU
# at real widths) -> $O/famk/kernels.json. moek: its moe part (the fused MoE kernel at Mixtral-8x7B / Qwen3-30B-A3B layer
# shapes, 1..4096 tokens: correctness, CUDA-graph replay, times vs the bytes floor and a torch per-expert loop, the layer with
# the one-launch alignment kernel on and off, that kernel bit for bit vs the torch ops at 1..8192 tokens and both timed alone,
# a tile sweep of MOESW seconds, default 50) -> $O/moek/kernels.json. moei: its integer experts alone (WEIR_MOE_ONLY=int), with
# more decode tiles of the grouped GEMM (MOEIT: "n,k,stages;...", none by default) and GEMV launches (MOEGV: "block_n,split_k,num_warps;...", split 0: the default) timed at 1 and 8 tokens -> $O/moei/kernels.json. fam: gpu_family_check.py (FAM_PARTS: a = tiny new families vs
# transformers on the GPU, fp32 and bf16; b = dummy-weight starts of Mixtral-8x7B (2 layers) and Gemma-2-9B: Triton vs the
# torch ops, graphs vs eager) -> $O/fam/family_check.json. moet2: T2-like throughput on a Qwen3-30B-A3B-shaped dummy model
# (MOEN requests, default 400; MOEPEER=hf (default) or none: transformers' generate() on the first MOEPN=32 requests, MOEPS=16
# steps, extrapolated; run after weir's figure, --peer-last, so a slow MoE peer loses only its own) -> $O/moet2.json. moel1: L1
# (batch 1 and 8 ITL, the roofline counting only the experts a step reads) on the same shape, the peer likewise -> $O/moel1.json.
# moel10 / moel1r: moel1 without the peer, the router's torch lines / its one-launch kernel (WEIR_MOE_ROUTE_KERNEL=1,
# ops/triton/moe_route.py): an A/B in one call; its kernel test on CUDA: STEPS=pyt PYT=tests/ops/test_moe_route.py; engrt: the
# engine check with it on.
set -o pipefail
export PYTHONUNBUFFERED=1
O=/tmp/o; mkdir -p $O
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD WEIR_COMMIT=$(cat .commit)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $O/gpu.txt
step() { local name=$1 cap=$2; shift 2; local left=$(( ${DEADLINE:-560} - (SECONDS-T0) )); [ $cap -gt $left ] && cap=$left
  [ $cap -lt 20 ] && { echo "== $name skipped" | tee -a $O/steps.txt; return; }
  echo "== $name (cap ${cap}s) at $((SECONDS-T0))s: $*" | tee -a $O/steps.txt
  local t=$SECONDS; timeout -k 10 $cap "$@" > $O/$name.log 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS-t))s" | tee -a $O/steps.txt; tail -25 $O/$name.log; }
for s in $STEPS; do case $s in
  feat) step feat 150 env OUT=$O WEIR_CHECK_PARTS="${FEAT_PARTS:-b c}" python3 loadtest/gpu_feature_check.py;;
  eng) step eng 300 env OUT=$O WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  suite) mkdir -p $O/suite; OUT=$O/suite SUITE_BUDGET=${SB:-330} BENCHES="${BENCHES:-T2 S1 U1 K1}" step suite $((${SB:-330}+20)) bash loadtest/run_gpu_suite.sh;;
  k1lora) step k1lora 120 python3 loadtest/profile_kernels.py --mode batch1 --shape llama3-8b --input-len 32 --output-len 256 --decode-steps 20 --lora-rank 16 --out $O/k1_lora.json;;
  beam) step beam 150 python3 loadtest/bench_beam.py --shape llama3-8b --peer hf --peer-max-requests 8 --peer-max-steps 16 --out $O/b.json;;
  lora) step lora 300 python3 loadtest/bench_lora.py --shape llama3-8b --num-requests 300 --adapter-counts ${LORA_COUNTS:-8} --out $O/a.json;;
  cb) mkdir -p $O/cb; OUT=$O/cb SUITE_BUDGET=${CBB:-300} PEERS=hf-cb HF_CB_MAX_REQUESTS=${CBN:-64} BENCHES=T1 step cb $((${CBB:-300}+20)) bash loadtest/run_gpu_suite.sh;;
  cbng) step cbng ${CBB:-170} python3 loadtest/bench_throughput.py --workload t1 --shape qwen3-0.6b --peer hf-cb --hf-cb-variants ${CBV:-tuned} --hf-cb-cuda-graphs off --hf-cb-max-requests ${CBN:-64} --hf-cb-time-limit ${CBT:-60} --out $O/cbng.json;;
  pyt) step pyt 120 python3 -m pytest -q -p no:cacheprovider ${PYT:-tests/ops/test_rotary_kv.py tests/ops/test_fp8_kv_kernels.py};;
  l1) step l1 150 python3 loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 --peer hf --peer-max-steps 48 --out $O/l1.json;;
  s16) step s16 150 python3 loadtest/bench_serving.py --shape llama3-8b --num-requests 240 --request-rates 16 --num-requests-finite-rate 240 --offline none --server-log $O/server_s16.log --out $O/s16.json;;
  u1cold) step u1cold 150 env TRITON_CACHE_DIR=$(mktemp -d) python3 loadtest/bench_startup.py --shape llama3-8b --no-split --no-imports --server-log $O/server_u1_cold.log --out $O/u1_cold.json;;
  u1coldcp) step u1coldcp 150 env TRITON_CACHE_DIR=$(mktemp -d) WEIR_COMPILE_WORKERS=${CPW:-8} python3 loadtest/bench_startup.py --shape llama3-8b --no-split --no-imports --server-log $O/server_u1_cold_cp.log --out $O/u1_cold_cp.json;;
  u1cp) step u1cp 150 env WEIR_COMPILE_WORKERS=${CPW:-8} python3 loadtest/bench_startup.py --shape llama3-8b --no-split --no-imports --server-log $O/server_u1_cp.log --out $O/u1_cp.json;;
  u1rw) step u1rw 150 env WEIR_GRAPH_WARMUPS=representative python3 loadtest/bench_startup.py --shape llama3-8b --no-split --no-imports --server-log $O/server_u1_rw.log --out $O/u1_rw.json;;
  u1coldcprw) step u1coldcprw 150 env TRITON_CACHE_DIR=$(mktemp -d) WEIR_COMPILE_WORKERS=${CPW:-8} WEIR_GRAPH_WARMUPS=representative python3 loadtest/bench_startup.py --shape llama3-8b --no-split --no-imports --server-log $O/server_u1_cold_cp_rw.log --out $O/u1_cold_cp_rw.json;;
  engrt) mkdir -p $O/engrt; step engrt 300 env OUT=$O/engrt WEIR_MOE_ROUTE_KERNEL=1 WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  engrw) mkdir -p $O/engrw; step engrw 300 env OUT=$O/engrw WEIR_GRAPH_WARMUPS=representative WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  tracecp) step tracecp 150 env WEIR_COMPILE_WORKERS=${CPW:-8} python3 loadtest/trace_compiles.py --shape llama3-8b --out $O/compiles_cp.json;;
  engcp) mkdir -p $O/engcp; step engcp 420 env OUT=$O/engcp TRITON_CACHE_DIR=$(mktemp -d) WEIR_COMPILE_WORKERS=${CPW:-8} WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  sampler) step sampler 90 python3 loadtest/bench_sampler.py --out $O/sampler.json;;
  trace) step trace 150 python3 loadtest/trace_compiles.py --shape llama3-8b --out $O/compiles.json;;
  u1m*) mkdir -p /tmp/u1m_cache; step $s 150 env TRITON_CACHE_DIR=/tmp/u1m_cache python3 loadtest/bench_startup.py --shape llama3-8b --no-split --no-imports --server-log $O/server_$s.log --out $O/$s.json;;
  s1x) step s1xt2 120 python3 loadtest/bench_throughput.py --workload t2 --shape llama3-8b --num-requests 1000 --peer none --out $O/s1x_t2.json
    for r in 1 2 3; do step s1x$r 100 python3 loadtest/bench_serving.py --shape llama3-8b --num-requests 1000 --request-rates inf --offline-json $O/s1x_t2.json --peer none --server-log $O/server_s1x$r.log --out $O/s1x$r.json; done;;
  k8) step k8 120 python3 loadtest/profile_kernels.py --mode batch1 --decode-batch 8 --shape llama3-8b --input-len 32 --output-len 256 --decode-steps 20 --out $O/profile_l1_b8.json;;
  u1) step u1 150 python3 loadtest/bench_startup.py --shape llama3-8b --no-split --no-imports --server-log $O/server_u1.log --out $O/u1.json;;
  abold*) step $s 60 env PYTHONPATH=/tmp/site:$PWD/ab_old python3 ab_old/loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 --peer none --out $O/$s.json;;
  fda0*|fda1*) step $s 60 env WEIR_FUSED_DECODE_ATTENTION=${s:3:1} python3 loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 --peer none --out $O/$s.json;;
  engfda) mkdir -p $O/engfda; step engfda 300 env OUT=$O/engfda WEIR_FUSED_DECODE_ATTENTION=1 WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  skin) step skin ${SKC:-200} python3 loadtest/sweep_gemv.py --shape llama3-8b --batches ${SKB:-2,4,8,16} --kinds skinny --out $O/sweep_skinny.json --skinny-launches-out $O/skinny_launches.json;;
  engsk) mkdir -p $O/engsk; echo '{"*": {"block_n": 32, "block_k": 64, "split_k": 2, "num_warps": 4, "num_stages": 2}}' > $O/skinny_all.json
    step engsk 300 env OUT=$O/engsk WEIR_SKINNY_GEMM=1 WEIR_SKINNY_GEMM_LAUNCHES=$O/skinny_all.json WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  k1s) step k1s 120 env WEIR_SKINNY_GEMM=1 python3 loadtest/profile_kernels.py --mode batch1 --shape llama3-8b --input-len 32 --out $O/profile_l1_skinny.json;;
  grs0*|grs1*) step $s 120 env WEIR_SKINNY_GEMM=${s:3:1} python3 loadtest/profile_kernels.py --mode batch1 --shape llama3-8b --input-len 32 --decode-steps 4 --replay-sizes ${GRS:-1,2,8,16,32,64,128,256} --out $O/$s.json;;
  t2s0*|t2s1*) step $s 120 env WEIR_SKINNY_GEMM=${s:3:1} python3 loadtest/bench_throughput.py --workload t2 --shape llama3-8b --num-requests ${T2SN:-1000} --peer none --out $O/$s.json;;
  f8l0*|f8l1*) step $s 90 env WEIR_FP8_SKINNY_GEMM=${s:3:1} python3 loadtest/bench_latency.py --shape llama3-8b --quantization fp8 --batch-sizes 1,8 --peer none --out $O/$s.json;;
  prb0*|prb1*) t=${s%q}; step $s 90 env WEIR_SKINNY_GEMM=${s:3:1} python3 loadtest/probe_carveout.py --shape llama3-8b $([ $t != $s ] && echo --quantization fp8) --before-build $(case $t in *big) echo skinny_big;; *48) echo skinny_48kb;; *bg) echo skinny_big_graph;; *sg) echo skinny_48kb_graph;; *fg) echo fp8_skinny_graph;; *cg) echo cublas_graph;; *al) echo alloc;; *) echo none;; esac) --out $O/$s.json;;
  pab0*|pab1*) step $s 90 env WEIR_SKINNY_GEMM=${s:3:1} python3 loadtest/probe_carveout.py --shape llama3-8b --after-build ${s:4} --out $O/$s.json;;
  pws0|pws1) step $s 90 env WEIR_SKINNY_GEMM=${s:3:1} python3 loadtest/probe_carveout.py --shape llama3-8b --warm-up-stream default --out $O/$s.json;;
  ptr0|ptr1) step $s 90 env WEIR_SKINNY_GEMM=${s:3:1} python3 loadtest/probe_carveout.py --shape llama3-8b --trace-streams --out $O/$s.json;;
  pmc0*|pmc1*) step $s 90 env WEIR_SKINNY_GEMM=${s:3:1} CUDA_DEVICE_MAX_CONNECTIONS=${PMC:-32} python3 loadtest/probe_carveout.py --shape llama3-8b --after-build ${s:4} --out $O/$s.json;;
  k8s) step k8s 120 env WEIR_SKINNY_GEMM=1 python3 loadtest/profile_kernels.py --mode batch1 --decode-batch 8 --shape llama3-8b --input-len 32 --output-len 256 --decode-steps 20 --out $O/profile_l1_b8_skinny.json;;
  fsk) step fsk ${FSC:-300} python3 loadtest/sweep_gemv.py --shape llama3-8b --batches ${FSB:-1,2,8} --kinds fp8,skinny --out $O/sweep_fp8_skinny.json;;
  s48) step s48 ${SKC:-150} python3 loadtest/sweep_gemv.py --shape llama3-8b --batches ${SKB:-2,8,16} --kinds skinny --skinny-max-shared-kb 48 --out $O/sweep_skinny_48kb.json --skinny-launches-out $O/skinny_48kb.json;;
  sm1*) step $s 60 env WEIR_SKINNY_GEMM=1 WEIR_SKINNY_GEMM_LAUNCHES=$O/skinny_48kb.json python3 loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 --peer none --out $O/$s.json;;
  sl1*) echo '{"4096x6144": {"block_n": 64, "block_k": 128, "split_k": 1, "num_warps": 4, "num_stages": 5}, "4096x4096": {"block_n": 64, "block_k": 128, "split_k": 1, "num_warps": 4, "num_stages": 5}, "4096x28672": {"block_n": 64, "block_k": 128, "split_k": 1, "num_warps": 4, "num_stages": 5}, "14336x4096": {"block_n": 64, "block_k": 128, "split_k": 2, "num_warps": 4, "num_stages": 5}}' > $O/skinny_100kb.json
    step $s 60 env WEIR_SKINNY_GEMM=1 WEIR_SKINNY_GEMM_LAUNCHES=$O/skinny_100kb.json python3 loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 --peer none --out $O/$s.json;;
  sk0*|sk1*) step $s 60 env WEIR_SKINNY_GEMM=${s:2:1} WEIR_SKINNY_GEMM_LAUNCHES=$([ -s $O/skinny_launches.json ] && echo $O/skinny_launches.json) python3 loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 --peer none --out $O/$s.json;;
  pdl0*|pdl1*) step $s 60 env WEIR_PDL=${s:3:1} python3 loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 --peer none --out $O/$s.json;;
  fp8mm|fp8mmb) step $s ${FMC:-120} python3 loadtest/probe_fp8_gemm.py --shape llama3-8b --rows ${FMR:-256,2048,8192} --out $O/${s/fp8mm/fp8_gemm}.json;;
  q3fa) step q3fa 200 env WEIR_FP8_FAST_ACCUM=1 python3 loadtest/bench_quant.py --shape llama3-8b --cases Q3 --t2-requests ${Q3N:-1000} --out $O/q3fa.json;;
  q3) step q3 200 python3 loadtest/bench_quant.py --shape llama3-8b --cases Q3 --t2-requests 1000 --out $O/q3.json;;
  fp8kv) mkdir -p $O/fp8kv; step fp8kv 150 env OUT=$O/fp8kv python3 loadtest/gpu_kernel_check.py fp8kv;;
  featew) mkdir -p $O/featew; step featew 150 env OUT=$O/featew WEIR_FP8_KV_WIDEN=1 WEIR_CHECK_PARTS=e python3 loadtest/gpu_feature_check.py;;
  q34w) step q34w 330 env WEIR_FP8_KV_WIDEN=1 python3 loadtest/bench_quant.py --shape llama3-8b --cases Q3,Q4,Q3KV --t2-requests ${Q34N:-500} --out $O/q34w.json;;
  q2p0*|q2p1*) step $s 120 env WEIR_FP8_GEMV_PIPELINE=${s:3:1} python3 loadtest/bench_quant.py --shape llama3-8b --cases Q2 --out $O/$s.json;;
  t2f0*|t2f1*) step $s 150 env WEIR_FLASH_PREFILL=${s:3:1} python3 loadtest/bench_throughput.py --workload t2 --shape llama3-8b --num-requests ${T2FN:-1000} --peer none --out $O/$s.json;;
  q3f) step q3f 200 env WEIR_FLASH_PREFILL=1 python3 loadtest/bench_quant.py --shape llama3-8b --cases Q3 --t2-requests ${Q3N:-1000} --out $O/q3f.json;;
  engf) mkdir -p $O/engf; step engf 300 env OUT=$O/engf WEIR_FLASH_PREFILL=1 WEIR_FLASH_PREFILL_MIN_TOKENS=1 WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  q1c0*|q1c1*) step $s 120 env WEIR_W4_COL_BLOCKED=${s:3:1} python3 loadtest/bench_quant.py --shape llama3-8b --cases Q1 --q1-methods ${Q1M:-gptq} --out $O/$s.json;;
  engc) mkdir -p $O/engc; step engc 300 env OUT=$O/engc WEIR_W4_COL_BLOCKED=1 WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  q1m0*|q1m1*) step $s 120 env WEIR_W4_META_2D=${s:3:1} python3 loadtest/bench_quant.py --shape llama3-8b --cases Q1 --q1-methods ${Q1M:-gptq} --out $O/$s.json;;
  q1p0*|q1p1*) step $s 150 env WEIR_L2_PREFETCH=${s:3:1} python3 loadtest/bench_quant.py --shape llama3-8b --cases Q1,Q2 --out $O/$s.json;;
  l1p0*|l1p1*) step $s 60 env WEIR_L2_PREFETCH=${s:3:1} python3 loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 --peer none --out $O/$s.json;;
  engl2p) mkdir -p $O/engl2p; step engl2p 300 env OUT=$O/engl2p WEIR_L2_PREFETCH=1 WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  t1prof) step t1prof 150 python3 loadtest/bench_throughput.py --workload t1 --shape qwen3-0.6b --peer none --host-profile ${T1PN:-80} --out $O/t1prof.json;;
  t1k0*|t1k1*) step $s 120 env WEIR_FP8_KV_WIDEN=${T1KW:-1} python3 loadtest/bench_throughput.py --workload t1 --shape qwen3-0.6b --peer none $([ ${s:3:1} = 1 ] && echo --kv-cache-dtype fp8) --out $O/$s.json;;
  featdp) mkdir -p $O/featdp; step featdp 150 env OUT=$O/featdp WEIR_L2_PREFETCH=1 WEIR_CHECK_PARTS=d python3 loadtest/gpu_feature_check.py;;
  featd) step featd 240 env OUT=$O WEIR_CHECK_PARTS=d python3 loadtest/gpu_feature_check.py;;
  featd8) mkdir -p $O/featd8; step featd8 240 env OUT=$O/featd8 WEIR_CHECK_PARTS=d WEIR_CHECK_QUANT_PROMPTS=8 python3 loadtest/gpu_feature_check.py;;
  q1k0*|q1k1*) step $s 120 env WEIR_W4_SKINNY_GEMM=${s:3:1} python3 loadtest/bench_quant.py --shape llama3-8b --cases Q1 --q1-methods ${Q1M:-gptq} --l1-batch ${Q1B:-8} --out $O/$s.json;;
  q1u0*|q1u1*) step $s 120 env WEIR_W4_SKINNY_GEMM=${s:3:1} python3 loadtest/bench_quant.py --shape llama3-8b --cases Q1 --q1-methods ${Q1M:-gptq} --out $O/$s.json;;
  engm) mkdir -p $O/engm; step engm 300 env OUT=$O/engm WEIR_W4_META_2D=1 WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  engpdl) mkdir -p $O/engpdl; step engpdl 300 env OUT=$O/engpdl WEIR_PDL=1 WEIR_CHECK_PARTS="${ENG_PARTS:-a}" python3 loadtest/gpu_engine_check.py;;
  abnew*) step $s 60 python3 loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 --peer none --out $O/$s.json;;
  gemv) step gemv ${GC:-400} python3 loadtest/sweep_gemv.py --shape llama3-8b --batches ${GB:-1,2} --kinds ${GK:-w4,fp8,bf16} $GX --out $O/sweep_gemv.json;;
  kern) step kern ${KC:-150} env OUT=$O python3 loadtest/gpu_kernel_check.py ${KPARTS:-correctness cuda};;
  famk) mkdir -p $O/famk; step famk 60 env OUT=$O/famk python3 loadtest/gpu_kernel_check.py families;;
  moek) mkdir -p $O/moek; step moek 150 env OUT=$O/moek WEIR_MOE_SWEEP_S=${MOESW:-50} python3 loadtest/gpu_kernel_check.py moe;;
  moei) mkdir -p $O/moei; step moei 150 env OUT=$O/moei WEIR_MOE_ONLY=int WEIR_MOE_INT_TILES="${MOEIT:-}" WEIR_MOE_GEMV_LAUNCHES="${MOEGV:-32,0,4;128,0,4;64,1,4;64,0,8;64,0,2;32,0,2}" python3 loadtest/gpu_kernel_check.py moe;;
  fam) mkdir -p $O/fam; step fam 240 env OUT=$O/fam WEIR_CHECK_PARTS="${FAM_PARTS:-a b}" WEIR_CHECK_LIMIT_S=200 WEIR_COMPILE_WORKERS=${CPW:-8} python3 loadtest/gpu_family_check.py;;
  moet2) step moet2 150 python3 loadtest/bench_throughput.py --workload t2 --shape qwen3-30b-a3b --num-requests ${MOEN:-400} --peer ${MOEPEER:-hf} --peer-max-requests ${MOEPN:-32} --peer-max-steps ${MOEPS:-16} --peer-last --out $O/moet2.json;;
  moel1r) step moel1r 100 env WEIR_MOE_ROUTE_KERNEL=1 python3 loadtest/bench_latency.py --shape qwen3-30b-a3b --batch-sizes 1,8 --num-iters 3 --num-iters-warmup 1 --peer none --out $O/moel1r.json;;
  moel10) step moel10 100 python3 loadtest/bench_latency.py --shape qwen3-30b-a3b --batch-sizes 1,8 --num-iters 3 --num-iters-warmup 1 --peer none --out $O/moel10.json;;
  moel1) step moel1 100 python3 loadtest/bench_latency.py --shape qwen3-30b-a3b --batch-sizes 1,8 --num-iters 3 --num-iters-warmup 1 --peer ${MOEPEER:-hf} --peer-max-steps ${MOEPS:-16} --peer-last --out $O/moel1.json;;
  diag) step diag ${DIAGC:-200} python3 loadtest/diagnose_divergence.py --family ${DIAGF:-gemma2} ${DIAGX:-} --out $O/diag_${DIAGF:-gemma2}.json;;
  peer4) step peer4 ${P4C:-240} python3 loadtest/peer_w4_gemv.py --shape llama3-8b --batches ${P4B:-1} --max-registers "${P4R-96,80}" ${P4V:+--variants "$P4V"} --out $O/peer_w4.json;;
  stalls) step stalls ${STC:-150} python3 loadtest/probe_gemv_stalls.py --shape llama3-8b --layers ${STL:-qkv,gate_up,down} --kinds ${STK:-w4,fp8,attn} --out-dir $O/stalls;;
  tiny) step tiny ${TYC:-200} python3 loadtest/probe_tinygemm.py --shape llama3-8b --batches ${TYB:-1,2,4,8,16} $TYX --out $O/tinygemm.json;;
  probe) step probe 150 python3 loadtest/probe_w4_layout.py --out $O/probe.json;;
  q12fda) step q12fda 150 env WEIR_FUSED_DECODE_ATTENTION=1 python3 loadtest/bench_quant.py --shape llama3-8b --cases Q1,Q2 --out $O/q12fda.json;;
  q12moe8) step q12moe8 420 python3 loadtest/bench_quant.py --shape qwen3-30b-a3b --cases Q1,Q2 --q1-methods ${Q1M:-gptq} --l1-batch 8 --out $O/q12moe8.json;;
  q12b8) step q12b8 240 python3 loadtest/bench_quant.py --shape llama3-8b --cases Q1,Q2 --q1-methods ${Q1M:-gptq} --l1-batch 8 --out $O/q12b8.json;;
  q12moe) step q12moe 420 python3 loadtest/bench_quant.py --shape qwen3-30b-a3b --cases Q1,Q2 --q1-methods ${Q1M:-gptq} --out $O/q12moe.json;;
  q2moe0|q2moe1) step $s 200 env WEIR_MOE_FP8_GEMV=${s#q2moe} python3 loadtest/bench_quant.py --shape qwen3-30b-a3b --cases Q2 --out $O/$s.json;;
  q12) step q12 150 python3 loadtest/bench_quant.py --shape llama3-8b --cases Q1,Q2 --out $O/q12.json;;
  sweep) step sweep ${SWC:-170} python3 loadtest/sweep_lora_gemv.py $SWT --out $O/sweep_lora_gemv.json;;
  sweepseg) step sweepseg 150 python3 loadtest/sweep_lora_segments.py --out $O/sweep_lora_segments.json;;
  proffp8) step proffp8 150 python3 loadtest/profile_kernels.py --shape llama3-8b --num-requests 256 --input-len 512 --output-len 128 --prefill-steps 1 --decode-steps 8 --quantization fp8 --out $O/proffp8.json;;
  k1f8) step k1f8 120 python3 loadtest/profile_kernels.py --mode batch1 --shape llama3-8b --quantization fp8 --input-len 32 --out $O/profile_l1_fp8.json;;
  k1g) python3 -c "from pathlib import Path; from loadtest.bench_quant import quantized_copy, GPTQ; from loadtest.model_shapes import shape_dir; quantized_copy(str(shape_dir('llama3-8b')), Path('/tmp'), 'gptq8b', GPTQ)"
    step k1g 120 python3 loadtest/profile_kernels.py --mode batch1 --model /tmp/gptq8b --load-format dummy --input-len 32 --out $O/profile_l1_gptq.json;;
  t2p0*|t2p1*) step $s 150 env WEIR_PDL=${s:3:1} python3 loadtest/bench_throughput.py --workload t2 --shape llama3-8b --num-requests ${T2PN:-1000} --peer none --out $O/$s.json;;
  pdlq0*|pdlq1*) step $s 150 env WEIR_PDL=${s:4:1} python3 loadtest/bench_quant.py --shape llama3-8b --cases Q1,Q2 --q1-methods ${Q1M:-gptq} --out $O/$s.json;;
  sq80*|sq81*) L=$([ ${s:3:1} = 0 ] && echo ab_old/)
    step $s 150 env PYTHONPATH=/tmp/site:$PWD/${L:-.} python3 ${L}loadtest/bench_quant.py --shape llama3-8b --cases Q1,Q2 --q1-methods ${Q1M:-gptq} --l1-batch ${SQB:-8} --out $O/$s.json;;
  t2ab0*|t2ab1*) L=$([ ${s:4:1} = 0 ] && echo ab_old/)
    step $s 150 env PYTHONPATH=/tmp/site:$PWD/${L:-.} python3 ${L}loadtest/bench_throughput.py --workload t2 --shape llama3-8b --num-requests ${T2PN:-1000} --peer none --out $O/$s.json;;
  sb80*|sb81*) L=$([ ${s:3:1} = 0 ] && echo ab_old/)
    step $s 60 env PYTHONPATH=/tmp/site:$PWD/${L:-.} WEIR_SKINNY_GEMM=1 python3 ${L}loadtest/bench_latency.py --shape llama3-8b --batch-sizes 1,8 --peer none --out $O/$s.json;;
  k1) step k1 120 python3 loadtest/profile_kernels.py --mode batch1 --shape llama3-8b --input-len 32 --out $O/profile_l1.json;;
  ds[01][01]*) step $s 100 env WEIR_DECODE_TWO_STAGES=${s:2:1} WEIR_DECODE_WIDE_TILE=${s:3:1} python3 loadtest/bench_throughput.py --workload t1 --shape qwen3-0.6b --peer none --out $O/$s.json;;
  dt[01][01]*) step $s 120 env WEIR_DECODE_TWO_STAGES=${s:2:1} WEIR_DECODE_WIDE_TILE=${s:3:1} python3 loadtest/bench_throughput.py --workload t2 --shape llama3-8b --num-requests 1000 --peer none --out $O/$s.json;;
  pytds) step pytds 150 env WEIR_DECODE_TWO_STAGES=1 WEIR_DECODE_WIDE_TILE=1 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_kernels.py tests/ops/test_windowed_attention.py;;
  trz*|tra*) step $s 120 python3 loadtest/bench_throughput.py --workload t2 --shape llama3-8b --num-requests 1000 --peer none $([ ${s:2:1} = z ] && echo --admission-reserve-tokens 0) --out $O/$s.json;;
  q3z*|q3a*) step $s 200 python3 loadtest/bench_quant.py --shape llama3-8b --cases Q3 --t2-requests 1000 $([ ${s:2:1} = z ] && echo --admission-reserve-tokens 0) --out $O/$s.json;;
  p1) step p1 240 python3 loadtest/bench_prefix.py --shape llama3-8b --peer none --out $O/p1.json;;
  pt1) step pt1 120 python3 loadtest/profile_kernels.py --shape qwen3-0.6b --num-requests 144 --input-len 840 --output-len 128 --prefill-steps 1 --decode-steps 8 --out $O/pt1.json;;
  pt2) step pt2 150 python3 loadtest/profile_kernels.py --shape llama3-8b --num-requests 256 --input-len 1024 --output-len 128 --prefill-steps 1 --decode-steps 8 --out $O/pt2.json;;
  profbase|proflora) step $s 120 python3 loadtest/profile_kernels.py --shape llama3-8b --num-requests 256 --input-len 512 --output-len 128 --prefill-steps 1 --decode-steps 8 $([ $s = proflora ] && echo --lora-rank 16 --lora-adapters ${PROF_ADAPTERS:-64}) --out $O/$s.json;;
  coldn*) step $s 60 env TRITON_CACHE_DIR=$(mktemp -d) python3 loadtest/bench_startup.py --shape llama3-8b --no-split --no-imports --server-log $O/server_$s.log --out $O/$s.json;;
  coldo*) step $s 60 env TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=/tmp/site:$PWD/ab_old python3 ab_old/loadtest/bench_startup.py --shape llama3-8b --no-split --no-imports --server-log $O/server_$s.log --out $O/$s.json;;
  *) eval "$s";;
esac; done
python3 loadtest/ab_table.py $O > $O/ab.txt 2>&1; cat $O/ab.txt  # the A/B steps side by side (loadtest/ab_table.py)
echo "total $((SECONDS-T0))s" | tee -a $O/steps.txt
tar czf $OUT/r.tgz -C /tmp o
