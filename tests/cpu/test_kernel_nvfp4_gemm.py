"""The Triton NVFP4 GEMM on CPU: its arithmetic decoder under the Triton interpreter (in a child
process, see test_kernel_nvfp4_quantize.py for why), its PTX decoder emulated instruction by
instruction against the reference decode, and the launcher's argument checks."""

import re

import numpy as np
import pytest
import torch

from mixquant_serve.quant import nvfp4
from tests.interpret import run_interpreted


INTERPRETED_CHECK = r"""
import torch
from kernels.nvfp4_gemm import GemmConfig, nvfp4_gemm
from mixquant_serve.quant import nvfp4

failures = []
g = torch.Generator().manual_seed(0)
# K=16: one block; K=48 with block_k=32: a masked tail block; K=100: padding to 112; M, N not tile multiples
for m, n, k, config in [(1, 24, 16, GemmConfig(16, 16, 32, 4, 1)), (17, 24, 48, GemmConfig(16, 16, 32, 4, 1)),
                        (5, 40, 100, GemmConfig(16, 32, 64, 4, 1)), (33, 17, 64, GemmConfig(32, 16, 32, 4, 1))]:
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    if m > 1:
        x[0, :16] = 0.0  # a zero block: scale 0
        x[-1, :16] *= 3e-5  # a block with a subnormal E4M3 scale
        w[0, :16] *= 3e-5
    bias = torch.randn(n, generator=g)
    qa, qw = nvfp4.quantize(x), nvfp4.quantize(w)
    expected = nvfp4.dequantize(qa) @ nvfp4.dequantize(qw).T
    for with_bias in (False, True):
        out = nvfp4_gemm(qa.packed, qa.block_scale, qa.global_scale, qw.packed, qw.block_scale, qw.global_scale,
                         torch.float32, bias=bias if with_bias else None, config=config, decode_with_ptx=False)
        ref = expected + bias if with_bias else expected
        error = ((out - ref).norm() / ref.norm()).item()
        if out.shape != (m, n) or not error < 1e-6:
            failures.append(f"{m}x{n}x{k} bias={with_bias}: shape {tuple(out.shape)}, relative error {error}")
print("\n".join(failures) if failures else "all cases match")
raise SystemExit(1 if failures else 0)
"""


def test_arithmetic_decoder_matches_reference_under_interpreter() -> None:
    stdout = run_interpreted(INTERPRETED_CHECK)
    assert "all cases match" in stdout, stdout[-4000:]


def emulate_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Runs the decoder's PTX on 32-bit integers: mov, and, or, shr, prmt (default mode), mul.rn.f16x2."""
    registers = dict(operands)

    def value(token: str) -> int:
        token = token.strip()
        if token in registers:
            return registers[token]
        return int(token, 0) & 0xFFFFFFFF

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        opcode, rest = line.split(None, 1)
        dst, *srcs = [t.strip() for t in rest.split(",")]
        args = [value(t) for t in srcs]
        if opcode == "mov.b32":
            result = args[0]
        elif opcode == "and.b32":
            result = args[0] & args[1]
        elif opcode == "or.b32":
            result = args[0] | args[1]
        elif opcode == "shr.b32":
            result = args[0] >> args[1]
        elif opcode == "prmt.b32":
            source = args[0] | (args[1] << 32)  # bytes 0-3 from a, 4-7 from b
            result = 0
            for byte in range(4):
                selector = (args[2] >> (4 * byte)) & 0xF
                picked = (source >> (8 * (selector & 7))) & 0xFF
                if selector & 8:  # replicate the picked byte's sign bit
                    picked = 0xFF if picked & 0x80 else 0
                result |= picked << (8 * byte)
        elif opcode == "mul.rn.f16x2":
            halves = [np.array([a & 0xFFFF, a >> 16], dtype=np.uint16).view(np.float16) for a in args]
            product = (halves[0] * halves[1]).view(np.uint16)
            result = int(product[0]) | (int(product[1]) << 16)
        else:
            raise AssertionError(f"the emulator does not know {opcode}")
        registers[dst] = result & 0xFFFFFFFF
    return registers


def test_ptx_decoder_matches_reference_decode() -> None:
    pytest.importorskip("triton")
    from kernels.nvfp4_gemm import _DECODE_PTX

    asm = _DECODE_PTX.value
    outputs = sorted(set(re.findall(r"\$[0-3]\b", asm)))
    assert outputs == ["$0", "$1", "$2", "$3"]
    # Every output is written once, by the last instructions: an output may share a register with an input.
    writes = [line for line in asm.splitlines() if re.match(r"\s*\S+\s+\$[0-3],", line)]
    assert len(writes) == 4 and all(line.strip().startswith("mov.b32") for line in writes)

    signed_grid = nvfp4.E2M1_GRID + tuple(-v for v in nvfp4.E2M1_GRID)
    scales = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # every finite e4m3 >= 0
    rng = np.random.default_rng(0)
    for _ in range(400):
        packed = rng.integers(0, 256, size=4)
        scale = scales[rng.integers(0, len(scales), size=4)]
        s16 = scale.numpy().astype(np.float16).view(np.uint16).astype(np.int64)
        registers = emulate_ptx(asm, {"$4": int(sum(int(b) << (8 * i) for i, b in enumerate(packed))),
                                      "$5": int(s16[0] | (s16[1] << 16)), "$6": int(s16[2] | (s16[3] << 16))})
        got = np.array([registers[r] for r in ("$0", "$1", "$2", "$3")], dtype=np.uint32).view(np.float16)
        # got: lo(B0), lo(B1), lo(B2), lo(B3), hi(B0), hi(B1), hi(B2), hi(B3) after reordering
        low = got[[0, 1, 2, 3]]
        high = got[[4, 5, 6, 7]]
        for i in range(4):
            expected_low = np.float16(signed_grid[packed[i] & 0xF] * scale[i].item())
            expected_high = np.float16(signed_grid[packed[i] >> 4] * scale[i].item())
            assert low[i].view(np.uint16) == expected_low.view(np.uint16), (packed, scale, i, low[i], expected_low)
            assert high[i].view(np.uint16) == expected_high.view(np.uint16), (packed, scale, i, high[i], expected_high)
    # Exhaustive over bytes with scale 1: every nibble value, both positions
    for byte in range(256):
        registers = emulate_ptx(asm, {"$4": byte * 0x01010101, "$5": 0x3C003C00, "$6": 0x3C003C00})
        got = np.array([registers["$0"], registers["$2"]], dtype=np.uint32).view(np.float16)
        assert got[0] == signed_grid[byte & 0xF] and got[2] == signed_grid[byte >> 4], byte
        assert np.signbit(got[0]) == bool(byte & 0x8) and np.signbit(got[2]) == bool(byte & 0x80), byte


def quantized(rows: int, k: int) -> nvfp4.NVFP4Tensor:
    return nvfp4.quantize(torch.randn(rows, k))


def test_launcher_rejects_bad_arguments() -> None:
    pytest.importorskip("triton")
    from kernels.nvfp4_gemm import GemmConfig, nvfp4_gemm

    a, w = quantized(4, 64), quantized(8, 64)
    good = (a.packed, a.block_scale, a.global_scale, w.packed, w.block_scale, w.global_scale)
    with pytest.raises(ValueError, match="a_packed must be a contiguous 2-D uint8"):
        nvfp4_gemm(a.packed.float(), *good[1:], out_dtype=torch.float32)
    with pytest.raises(ValueError, match="a_packed must be a contiguous 2-D uint8"):
        nvfp4_gemm(torch.zeros(32, 4, dtype=torch.uint8).t(), *good[1:], out_dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of 8 bytes"):
        nvfp4_gemm(a.packed[:, :12].contiguous(), a.block_scale[:, :1].contiguous(), a.global_scale, *good[3:],
                   out_dtype=torch.float32)
    with pytest.raises(ValueError, match="w_block_scale must be a contiguous float8_e4m3fn tensor of shape"):
        nvfp4_gemm(*good[:4], w.block_scale[:, :2].contiguous(), w.global_scale, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="w_block_scale"):
        nvfp4_gemm(*good[:4], w.block_scale.float(), w.global_scale, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="a_global_scale"):
        nvfp4_gemm(a.packed, a.block_scale, torch.ones(2), *good[3:], out_dtype=torch.float32)
    other = quantized(8, 48)
    with pytest.raises(ValueError, match="same padded K"):
        nvfp4_gemm(*good[:3], other.packed, other.block_scale, other.global_scale, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        nvfp4_gemm(*good, out_dtype=torch.float64)
    with pytest.raises(ValueError, match="bias must be a contiguous \\[8\\]"):
        nvfp4_gemm(*good, out_dtype=torch.float32, bias=torch.zeros(7))
    with pytest.raises(ValueError, match="config needs block_k a multiple of 16"):
        nvfp4_gemm(*good, out_dtype=torch.float32, config=GemmConfig(16, 16, 24, 4, 1))


def test_launcher_handles_empty_shapes_without_launching() -> None:
    pytest.importorskip("triton")
    from kernels.nvfp4_gemm import nvfp4_gemm

    w = quantized(8, 64)
    empty = nvfp4.quantize(torch.randn(0, 64))
    out = nvfp4_gemm(empty.packed, empty.block_scale, empty.global_scale, w.packed, w.block_scale, w.global_scale,
                     out_dtype=torch.float32)
    assert out.shape == (0, 8)
