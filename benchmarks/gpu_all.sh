#!/usr/bin/env bash
# Everything that needs a GPU, as named stages (default: all of them, in this order):
#
#   bash benchmarks/gpu_all.sh                      # everything (well over 30 minutes)
#   bash benchmarks/gpu_all.sh tests kernels        # some stages (each fits a 10-minute call)
#
#   tune     the tile tuner, capped at 6 minutes, decode token counts first. It writes
#            kernels/configs/<device>.json, which every later stage reads. That file is the
#            H100 table: copy it back from $OUT and COMMIT it.
#   tests    the CUDA-marked tests: every Triton kernel against its twin in bf16/fp16/fp32 on the
#            device, and the engine against transformers with CUDA graphs.
#   kernels  launch counts on the device, then one MoE layer: fused vs grouped_mm and rank-exact
#            vs padded LoRA at 1..4,096 tokens.
#   engine   the offline engine at OLMoE-1B-7B shapes (random weights): batches 1..256, with
#            no adapter, 16 adapters and padded; transformers' generate; adapter-pool memory.
#   serve    HTTP, 64 streaming clients, 16 adapters, OLMoE shapes.
#   qwen3    the engine and HTTP rows at Qwen3-30B-A3B shapes (4 adapters; 57 GiB of weights).
#   train    the DR-LoRA vs LoRA training step at OLMoE shapes.
#   host     the structured-output host cost on this machine's 16 host cores (stub model, CPU),
#            and mask filling and matcher advancing alone, in the calling thread vs llguidance's pool (grammar_fill.py).
#   summary  benchmarks/gpu_summary.py: the issue's headline figures with their targets, in
#            $OUT/gpu-h100.json (copy it to benchmarks/results/ and commit it).
#
# Results (JSON and logs) go to bench-gpu/. On the device machine (OUT set) they go to a work
# folder instead, packed after every stage into $OUT/gpu_all_results.tgz: only 8 files come back
# from $OUT, and a call killed at its time limit still returns the stages it finished. Unpack
# each call's archive into one folder here (tar xzf ... -C bench-gpu). Written for the first GPU
# session; it has not run yet. The device image lacks the server's dependencies (fastapi, uvicorn, pydantic,
# pyzmq, msgspec, httptools, llguidance): `bash scripts/device_wheels.sh` here fetches their
# wheels into .whl/, to carry and install there first (see that script).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ]; then
  out=$(mktemp -d /tmp/gpu_all.XXXXXX)
  pack() { tar czf "$OUT/gpu_all_results.tgz" -C "$out" . ; }
else
  out=bench-gpu
  pack() { :; }
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tune tests kernels engine serve qwen3 train host summary)

for stage in "${stages[@]}"; do
  echo "== stage $stage ($(date -u +%H:%M:%S))"
  case $stage in
  tune)
    python benchmarks/tune.py --shape olmoe qwen3-moe --max-seconds 360 2>&1 | tee "$out/tune.log"
    cp kernels/configs/*.json "$out/" 2>/dev/null
    [ -n "${OUT:-}" ] && cp kernels/configs/*.json "$OUT/" 2>/dev/null ;;  # the table to commit, unpacked
  tests)
    python -m pytest -q -p no:cacheprovider -m cuda tests/kernels tests/serve tests/train 2>&1 | tee "$out/cuda_tests.log" ;;
  kernels)
    python benchmarks/launch_count.py --device cuda --dense --host --out "$out/launches.json" 2>&1 | tee "$out/launches.log"
    python benchmarks/kernel_bench.py --large --out "$out/kernels.json" 2>&1 | tee "$out/kernels.log" ;;
  engine)
    python benchmarks/engine.py --batches 1 16 64 128 256 --padded-batches 64 --out "$out/engine.json" 2>&1 | tee "$out/engine.log"
    python benchmarks/engine.py --memory-only --out "$out/engine_memory.json" 2>&1 | tee -a "$out/engine.log" ;;
  serve)
    python benchmarks/serve.py --dummy olmoe --make-adapters 16 -c 64 -n 512 --max-tokens 128 \
        --out "$out/serve.json" 2>&1 | tail -20 | tee "$out/serve.log" ;;
  qwen3)
    python benchmarks/engine.py --shape qwen3-moe --hf-batches 1 16 --out "$out/engine_qwen3.json" 2>&1 | tee "$out/engine_qwen3.log"
    python benchmarks/engine.py --shape qwen3-moe --memory-only --out "$out/engine_qwen3_memory.json" 2>&1 | tee -a "$out/engine_qwen3.log"
    python benchmarks/serve.py --dummy qwen3-moe --make-adapters 4 -c 64 -n 256 --max-tokens 128 \
        --out "$out/serve_qwen3.json" 2>&1 | tail -20 | tee "$out/serve_qwen3.log" ;;
  train)
    python benchmarks/train_overhead.py --device cuda --out "$out/train_overhead.json" 2>&1 | tee "$out/train_overhead.log" ;;
  host)
    # the 2-core CI machine gave 1.56x with no device time (target <= 1.5x): half the rows of
    # batch 64 schema-constrained vs none, three interleaved rounds; "inline" fills the masks in
    # the calling thread instead of LLExecutor's pool (which one wins on 16 cores?)
    for round in 1 2 3; do
      for frac in 0 0.5 inline; do
        env=(); f=$frac
        [ "$frac" = inline ] && env=(DRLORA_GRAMMAR_THREADS=1) && f=0.5
        env "${env[@]}" python benchmarks/host_overhead.py --device-ms 0 4.6 --batches 64 --skip-http --big-prompt-mb 0 \
            --constrained-fraction $f --out "$out/host_constrained_${frac}_r${round}.json" 2>&1 | tee -a "$out/host_constrained.log"
      done
    done
    # mask filling alone, the calling thread vs LLExecutor's pool per batch size (PARALLEL_MIN_ROWS)
    python benchmarks/grammar_fill.py --threads 4 12 --out "$out/grammar_fill_v849.json" 2>&1 | tee "$out/grammar_fill.log"
    python benchmarks/grammar_fill.py --threads 4 12 --bpe-vocab 50304 --out "$out/grammar_fill_v50k.json" 2>&1 | tee -a "$out/grammar_fill.log" ;;
  summary)
    python benchmarks/gpu_summary.py "$out" --out "$out/gpu-h100.json" 2>&1 | tee "$out/summary.log" ;;
  *)
    echo "gpu_all.sh: unknown stage '$stage' (tune tests kernels engine serve qwen3 train host summary)" >&2
    exit 2 ;;
  esac
  pack
done
