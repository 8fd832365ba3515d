#!/usr/bin/env bash
# The GPU benchmarks in one run of at most 8 minutes on one GPU (issue #18), writing bench/results/*_cuda.json, which
# nbs/11_benchmarks.ipynb shows:
#   1. peak memory of scoring (exact and fast), finetuning and sampling on the CIFAR-10 config (memory.py);
#   2. importance speed, the paper's loop against exact and fast mode (importance_speed.py);
#   3. speed against MACs on the CIFAR-10 config: eager and compiled, fp32 and bf16, torch.compile's default mode and
#      'reduce-overhead' (CUDA graphs), at batch 1 and 128 (speedup_vs_macs.py), in the time that is left.
# Each script rewrites its JSON as it goes, so a step stopped at the time limit keeps what it measured.
#
#   bash bench/gpu.sh                          # on a GPU
#   bash bench/gpu.sh --device cpu --quick     # anywhere, in seconds: the same scripts on tiny settings (a test runs it)
set -euo pipefail
device=cuda; quick=(); out="$(cd "$(dirname "$0")" && pwd)/results"; limit=480
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2;;
    --quick) quick=(--quick); shift;;
    --out) out="$2"; shift 2;;
    --limit) limit="$2"; shift 2;;
    *) echo "bench/gpu.sh: unknown argument $1 (it takes --device DEVICE, --quick, --out FOLDER, --limit SECONDS)" >&2
       exit 2;;
  esac
done
cd "$(dirname "$0")"
py="${PYTHON:-python3}"
left() { echo $(( limit - SECONDS )); }

"$py" memory.py --device "$device" "${quick[@]}" --out "$out"
"$py" importance_speed.py --device "$device" "${quick[@]}" --cifar-batch 32 --out "$out"
# speed takes what is left, less 15 s to write up; its JSON holds every configuration finished by then
status=0
timeout "$(( $(left) - 15 ))" "$py" speedup_vs_macs.py --device "$device" "${quick[@]}" --out "$out" \
  --families cifar10 --targets 0.5 --round-to 8 \
  --configs fp32:eager:1 fp32:eager:L bf16:eager:1 bf16:eager:L bf16:default:L bf16:reduce-overhead:1 \
            bf16:reduce-overhead:L fp32:default:L || status=$?
if [ "$status" = 124 ]; then echo "bench/gpu.sh: speedup_vs_macs.py stopped at the time limit; its JSON keeps the configurations it finished"
elif [ "$status" != 0 ]; then exit "$status"; fi
echo "bench/gpu.sh: done in ${SECONDS} s; results in $out"
