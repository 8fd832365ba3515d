#!/usr/bin/env bash
# The GPU benchmarks in one run of at most 8 minutes on one GPU (issues #18, #29, #30, #31, #32), writing
# bench/results/*_cuda.json, which nbs/11_benchmarks.ipynb shows (the first four are the ones not yet measured):
#   1. depth against width on an SD-1.5-sized UNet: teacher, the bk-sdm-small preset and width pruning to its MACs,
#      fp16, eager and compiled, batch 1 and 8 (unet_depth.py --sd15, 150 s; issue #30, not yet measured);
#   2. speed against MACs of a FLUX.1-dev-wide transformer with 2 + 4 blocks, by width and by depth, bf16, eager and
#      compiled (flux_speed.py, 150 s; issue #29, not yet measured);
#   3. pruned and quantized on CUDA: the digits UNet and DiT, teacher and pruned, plain, int8 weight-only, int8 dynamic
#      and (compute capability 8.9 and up) fp8, weight bytes and forward latency (quantize.py --gpu, 60 s; issue #31);
#   4. what sharded scoring and finetuning hold per parameter, counted on a FLUX.1-wide transformer of three blocks
#      and checked against the CUDA allocator (fsdp_memory.py, 60 s; issue #32, not yet measured);
#   5. peak memory of scoring (exact and fast), finetuning and sampling on the CIFAR-10 config (memory.py, 90 s);
#   6. importance speed, the paper's loop against exact and fast mode (importance_speed.py, 120 s);
#   7. speed against MACs on the CIFAR-10 config: eager and compiled, fp32 and bf16, torch.compile's default mode and
#      'reduce-overhead' (CUDA graphs), at batch 1 and 128 (speedup_vs_macs.py), in the time that is left.
# Each step has its own time limit, and the script goes on with the next when one is stopped at it: speedup_vs_macs.py
# rewrites its JSON after each configuration, so it keeps what it measured; memory.py and importance_speed.py write
# theirs at the end, so a stopped one leaves its earlier results as they were.
#
#   bash bench/gpu.sh                          # on a GPU
#   bash bench/gpu.sh --device cpu --quick     # anywhere, in a minute: the same scripts on tiny settings (a test runs it)
set -uo pipefail
usage="bench/gpu.sh takes --device DEVICE, --quick, --out FOLDER and --limit SECONDS"
device=cuda; quick=""; out="$(cd "$(dirname "$0")" && pwd)/results"; limit=480
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=--quick; shift; continue;;
    --device|--out|--limit) [ $# -ge 2 ] || { echo "bench/gpu.sh: $1 needs a value ($usage)" >&2; exit 2; };;
    *) echo "bench/gpu.sh: unknown argument $1 ($usage)" >&2; exit 2;;
  esac
  case "$1" in
    --device) device="$2";;
    --out) mkdir -p "$2" 2>/dev/null && out="$(cd "$2" && pwd)" \
             || { echo "bench/gpu.sh: cannot write to --out $2" >&2; exit 2; };;  # absolute before the cd below
    --limit) limit="$2";;
  esac
  shift 2
done
case "$limit" in ''|*[!0-9]*) echo "bench/gpu.sh: --limit must be whole seconds, not $limit" >&2; exit 2;; esac
limit=$((10#$limit))  # 08 is eight seconds, not a bad octal number
cd "$(dirname "$0")"
py="${PYTHON:-python3}"
failed=0

step() {  # step SECONDS SCRIPT ARGS...: run one benchmark under its limit; note a failure and go on
  local secs=$1; shift
  local left=$(( limit - SECONDS - 5 ))
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$secs" -lt 10 ]; then echo "bench/gpu.sh: no time left for $1; skipped"; return; fi
  timeout --foreground "$secs" "$py" "$@" $quick --device "$device" --out "$out"  # Ctrl-C reaches the step
  local rc=$?
  if [ $rc = 124 ]; then echo "bench/gpu.sh: $1 stopped at its limit of $secs s"; failed=1
  elif [ $rc != 0 ]; then echo "bench/gpu.sh: $1 failed (exit $rc)"; failed=1; fi
}

step 150 unet_depth.py --sd15
step 150 flux_speed.py
step 60 quantize.py --gpu
step 60 fsdp_memory.py
step 90 memory.py
step 120 importance_speed.py --cifar-batch 32
step "$limit" speedup_vs_macs.py --families cifar10 --targets 0.5 --round-to 8 \
  --configs fp32:eager:1 fp32:eager:L bf16:eager:L fp32:default:L bf16:default:L bf16:reduce-overhead:1 \
            bf16:reduce-overhead:L bf16:eager:1
echo "bench/gpu.sh: done in ${SECONDS} s; results in $out"
exit $failed
