#!/usr/bin/env bash
# The two-GPU runs of issue 8, one step per device call (each must stay under 10 minutes):
#   bash benchmarks/two_gpu.sh check            GPU test (shipped config: pools on two GPUs, greedy == pipeline)
#                                               + KV transfer benchmark (NIXL, GPU 0 -> GPU 1)
#   bash benchmarks/two_gpu.sh agentic SETUP    one setup of benchmarks/agentic.py (disagg-fp8 | disagg-bf16 | colocated-bf16)
#   bash benchmarks/two_gpu.sh report           merge the setups' JSON into one table and file
# Needs Ray and NIXL on PYTHONPATH (the device bundle unpacked into /tmp/site) and writes under $OUT.
set -uo pipefail
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_AUTH_MODE=disabled
out=${OUT:-/tmp/out}; mkdir -p "$out"
results=/tmp/mq-results; mkdir -p "$results"  # kept between calls on a warm machine
case "${1:-}" in
  check)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/cards.txt"
    nvidia-smi topo -m > "$out/topo.txt" 2>&1
    python3 -m pytest tests/gpu/test_serve_two_gpus.py -x -q -p no:cacheprovider 2>&1 | tail -40 | tee "$out/gpu-test.txt"
    python3 -m benchmarks.kv_transfer --out "$results/kv-transfer.json" 2>&1 | tee "$out/kv-transfer.txt"
    cp "$results/kv-transfer.json" "$out/" 2>/dev/null ;;
  agentic)
    python3 -m benchmarks.agentic run --setup "$2" --out "$results/agentic-$2.json" "${@:3}" 2>&1 \
      | grep -v -E '^\s*$' | tail -80 | tee "$out/agentic-$2.txt"
    cp "$results/agentic-$2.json" "$out/" 2>/dev/null ;;
  report)
    python3 -m benchmarks.agentic report "$results"/agentic-*.json --out "$out/agentic.json" | tee "$out/agentic.txt" ;;
  *) echo "usage: $0 check | agentic SETUP [options] | report" >&2; exit 2 ;;
esac
