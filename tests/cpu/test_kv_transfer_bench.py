"""benchmarks/kv_transfer.py on CPU memory: two processes, real NIXL, every pulled block checked."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("nixl")


def test_kv_transfer_benchmark_pulls_checked_blocks_between_processes(tmp_path, capsys):
    from benchmarks.kv_transfer import main

    out = tmp_path / "kv.json"
    rows = main(["--model", "tiny-llama", "--source-device", "cpu", "--dest-device", "cpu", "--dtype", "float32",
                 "--block-sizes", "4,16", "--tokens", "64,256", "--repeats", "2", "--warmup", "1", "--out", str(out)])
    assert [(r["block_size"], r["pattern"], r["tokens"]) for r in rows] == [
        (4, "scattered", 64), (4, "scattered", 256), (4, "contiguous", 256),
        (16, "scattered", 64), (16, "scattered", 256), (16, "contiguous", 256),
    ]
    assert all(r["checked"] and r["gb_per_s_median"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
    assert "GB/s" in capsys.readouterr().out
