"""GPU speed benchmarks: `python -m benchmarks.prefill` (ceilings, per-linear micro-benchmark, model prefill)."""
