#!/usr/bin/env bash
# The GPU numbers in RESULTS.md, on the device machine (see ../shared/gpu/README.md):
#   source .gpu/b/setup.sh && bash benchmarks/gpu_run.sh [step ...]
# Steps: profile, sep (NODES processes, default 3, one GPU each: GPUS=0,1 on a two-GPU machine,
# GPUS=0 on a one-GPU one), prefill (2048-token prompt, the same GPUs), shared (3 processes on
# one GPU), mps (the same under CUDA MPS, so the processes share the GPU
# without time-slicing between contexts), one (one process), tiny (the tiny preset: the ring's
# own cost per token, compute being almost nothing), wire (one hop between processes idle for
# 0, 10, 50 ms: how slowly this machine wakes them), wide (one hop of a 2048-token prompt
# chunk's activations), copy (what crossing between host and device costs one shard:
# benchmarks/device_copy.py), spec (one stream with speculative decoding and without, 3
# processes on one GPU, a made model whose text repeats: SCALE, default 1.0). MPS=1 runs every step under CUDA MPS (with gates, several processes
# on one GPU need it: see mlxring/backends/cuda/gate.py); GATES=off turns gates off; CONVOYS=1 runs all
# requests as one convoy (for processes sharing the GPU: benchmarks/RESULTS.md). Each writes JSON under $OUT
# (or /tmp/out).
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
export MLXRING_CACHE=${MLXRING_CACHE:-/tmp/mlxring-cache}
nvidia-smi -L > "$out/gpus.txt" 2>&1
bench="python3 -m mlxring bench --preset qwen3-1.7b --nodes ${NODES:-3} --json --gates ${GATES:-on} --convoys ${CONVOYS:-auto}"
mps_start() {
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p /tmp/mps /tmp/mps-log && nvidia-cuda-mps-control -d
}
mps_stop() {
  echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
[ "${MPS:-0}" = 1 ] && mps_start
for step in "${@:-profile sep prefill shared}"; do
  for s in $step; do
    echo "== $s $(date -u +%H:%M:%S)"
    case $s in
      profile) CUDA_VISIBLE_DEVICES=0 timeout 300 python3 benchmarks/decode_profile.py --json ;;
      sep) CUDA_VISIBLE_DEVICES=0 timeout 300 $bench --gpus "${GPUS:-1,2,3}" --prompt-tokens 512 \
             --gen-tokens 128 --concurrency 1,4,16 ;;
      prefill) CUDA_VISIBLE_DEVICES=0 timeout 300 $bench --gpus "${GPUS:-1,2,3}" --prompt-tokens 2048 \
             --gen-tokens 16 --concurrency 1 --prefill-chunk "${CHUNK:-512}" ;;
      spec) CUDA_VISIBLE_DEVICES=0 timeout 500 python3 -m mlxring bench --preset qwen3-1.7b \
             --scale "${SCALE:-1.0}" --nodes "${NODES:-3}" --gpus 0 --speculative ngram \
             --gen-tokens 128 --convoys 1 --json ;;
      shared) CUDA_VISIBLE_DEVICES=0 timeout 300 $bench --gpus 0 --prompt-tokens 512 \
             --gen-tokens 128 --concurrency 1,4,16 ;;
      mps) mps_start
           CUDA_VISIBLE_DEVICES=0 timeout 300 $bench --gpus 0 --prompt-tokens 512 \
             --gen-tokens 128 --concurrency 1,4,16
           mps_stop ;;
      tiny) CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m mlxring bench --preset tiny --nodes 3 \
             --json --prompt-tokens 64 --gen-tokens 256 --concurrency 1,16 ;;
      one) CUDA_VISIBLE_DEVICES=0 timeout 300 $bench --one-process --prompt-tokens 512 \
             --gen-tokens 128 --concurrency 1,4,16 ;;
      wire) for g in 0 10 50; do timeout 120 python3 benchmarks/wire_bench.py --processes \
              --gap-ms $g --n 300 --json; done ;;
      copy) CUDA_VISIBLE_DEVICES=0 timeout 300 python3 benchmarks/device_copy.py --json ;;
      wide) timeout 120 python3 benchmarks/wire_bench.py --processes --hidden 2048 --tokens 2048 \
              --n 100 --json ;;
    esac > "$out/$s.json" 2> "$out/$s.err"
    echo "rc=$? $(tail -c 600 "$out/$s.json")"
  done
done
[ "${MPS:-0}" = 1 ] && mps_stop
true
