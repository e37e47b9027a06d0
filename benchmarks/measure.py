"""Timing and card description shared by the benchmarks: median device time with CUDA events, and
the two ceilings every result is read against (matmul peak per precision, copy bandwidth)."""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable

import torch
import triton
import triton.testing

# Ceiling shapes: the brief's prefill-sized product (8192 tokens x 4096 x 4096) and the usual 8192^3.
CEILING_SHAPES = ((8192, 4096, 4096), (8192, 8192, 8192))
COPY_BYTES = 1 << 30


def median_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of fn in ms: triton's do_bench (CUDA events, L2 flushed before each repeat)."""
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def event_times_ms(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Each of `repeats` runs of fn timed with CUDA events after `warmup` untimed runs (for long calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def enqueue_ms(fn: Callable[[], object]) -> float:
    """Host time to issue fn's work (no synchronization inside): close to its device time means the
    device waits on the host (launch-bound)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    return (issued - started) * 1e3


def card() -> dict[str, object]:
    """The GPU and software a result was measured with."""
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }


def matmul_ceilings(device: torch.device) -> list[dict[str, object]]:
    """Measured TFLOP/s of bf16 and fp16 torch.mm and fp8 torch._scaled_mm (row-wise scales) on random data."""
    results = []
    for m, n, k in CEILING_SHAPES:
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        flops = 2 * m * n * k
        a16, b16 = a.half(), b.half()
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        scale_a = torch.rand(m, 1, device=device) + 0.5
        scale_b = torch.rand(1, n, device=device) + 0.5
        variants = {
            "bf16 torch.mm": lambda: torch.mm(a, b.t()),
            "fp16 torch.mm": lambda: torch.mm(a16, b16.t()),
            "fp8 _scaled_mm rowwise": lambda: torch._scaled_mm(a8, b8.t(), scale_a=scale_a, scale_b=scale_b,
                                                               out_dtype=torch.bfloat16),
        }
        for name, fn in variants.items():
            ms = median_ms(fn)
            results.append({"op": name, "m": m, "n": n, "k": k, "ms": ms, "tflops": flops / ms / 1e9})
        del a, b, a16, b16, a8, b8
    return results


def copy_bandwidth(device: torch.device) -> dict[str, object]:
    """Device-to-device copy of COPY_BYTES, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (COPY_BYTES,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return {"bytes_moved": 2 * COPY_BYTES, "ms": ms, "tb_per_s": 2 * COPY_BYTES / ms / 1e9}


def median(values: list[float]) -> float:
    return float(statistics.median(values))
