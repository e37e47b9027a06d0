"""The blocked ("swizzled") layout of NVFP4 block scales that FP4 tensor cores read (sm_100+).

torch._scaled_mm with float4_e2m1fn_x2 operands takes each operand's E4M3 block scales (one per 16
values along K) not row-major but in cuBLAS's block-scaling-factor layout: the [rows, K/16] scale
matrix is cut into tiles of 128 rows x 4 scale columns, zero-padded to whole tiles; tiles are stored
row-tile-major (all column tiles of rows 0..127 first), each as 512 bytes in which scale (r, c) of
the tile sits at

    (r % 32) * 16 + (r // 32) * 4 + c

(so 32 rows of 16 bytes, each holding 4 column-groups of the 4 rows r, r + 32, r + 64, r + 96).
`to_blocked` builds it with reshapes; `blocked_offset` is that formula, written out independently,
which the tests check it against. The packed values need no change: our nibble order (even element
in the low nibble, K contiguous) is float4_e2m1fn_x2's.
"""

import torch
from torch import Tensor

TILE_ROWS = 128
TILE_COLS = 4
TILE_BYTES = TILE_ROWS * TILE_COLS


def blocked_shape(rows: int, cols: int) -> tuple[int, int]:
    """Rows and scale columns after padding to whole 128 x 4 tiles."""
    return -(-rows // TILE_ROWS) * TILE_ROWS, -(-cols // TILE_COLS) * TILE_COLS


def blocked_offset(row: Tensor, col: Tensor, cols: int) -> Tensor:
    """Flat position, in the blocked layout of a scale matrix with `cols` scale columns, of scale (row, col)."""
    col_tiles = -(-cols // TILE_COLS)
    tile = (row // TILE_ROWS) * col_tiles + col // TILE_COLS
    r, c = row % TILE_ROWS, col % TILE_COLS
    return tile * TILE_BYTES + (r % 32) * 16 + (r // 32) * 4 + c


def to_blocked(scales: Tensor) -> Tensor:
    """scales: [rows, cols] (E4M3 block scales, row-major) -> 1-D blocked layout, zero-padded to whole tiles."""
    if scales.dim() != 2:
        raise ValueError(f"scales must be 2-D [rows, K/16], got shape {tuple(scales.shape)}")
    rows, cols = scales.shape
    padded_rows, padded_cols = blocked_shape(rows, cols)
    # bytes: zero-filling and reshaping float8 tensors is not supported everywhere; the layout moves bytes only
    data = scales.view(torch.uint8) if scales.dtype == torch.float8_e4m3fn else scales
    padded = data.new_zeros(padded_rows, padded_cols)
    padded[:rows, :cols] = data
    # [row tiles, 128, col tiles, 4] -> tiles in row-tile-major order, each [128, 4]
    tiles = padded.view(padded_rows // TILE_ROWS, TILE_ROWS, padded_cols // TILE_COLS, TILE_COLS).permute(0, 2, 1, 3)
    # inside a tile: row r = 32 * (r // 32) + r % 32 -> [r % 32][r // 32][c]
    blocked = tiles.reshape(-1, 4, 32, TILE_COLS).transpose(1, 2).reshape(-1)
    return blocked.view(scales.dtype) if scales.dtype == torch.float8_e4m3fn else blocked
