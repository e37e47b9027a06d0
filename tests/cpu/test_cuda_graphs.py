"""The device-free parts of decode under CUDA graphs: which batch sizes an engine captures, how block
tables are packed for the kernel, and that a CPU runner neither captures nor builds kernel inputs."""

import pytest
import torch

from mixquant_serve.engine.cuda_graphs import DECODE_GRAPH_BATCH_SIZES, DecodeGraphs, graph_batch_sizes
from mixquant_serve.engine.kv_cache import allocate_kv_cache
from mixquant_serve.engine.runner import ModelRunner
from mixquant_serve.model.attention import pack_block_tables
from mixquant_serve.model.loader import load_model


def test_graph_batch_sizes_cover_max_num_seqs() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert graph_batch_sizes(33) == [1, 2, 4, 8, 16, 32, 64]  # 33 pads up to 64
    assert graph_batch_sizes(1000) == list(DECODE_GRAPH_BATCH_SIZES)  # above 128: eager
    with pytest.raises(ValueError, match="max_num_seqs"):
        graph_batch_sizes(0)


def test_pack_block_tables() -> None:
    packed = pack_block_tables([[4, 2], [7], []], rows=4, width=3)
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[4, 2, 0], [7, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_cpu_runner_has_no_graphs_and_no_kernel_inputs() -> None:
    loaded = load_model("synthetic:tiny-llama", torch.device("cpu"), torch.float32, {"bf16"}, progress=False)
    cache = allocate_kv_cache(loaded.config, 4, 16, torch.float32, torch.device("cpu"))
    runner = ModelRunner(loaded.model, cache, 16, "bf16")
    assert runner.decode_graphs is None
    assert runner._decode_tensors([[0]], [1]) is None
    with pytest.raises(ValueError, match="CUDA kv_cache"):
        DecodeGraphs(loaded.model, cache, 16, "bf16", [1])
