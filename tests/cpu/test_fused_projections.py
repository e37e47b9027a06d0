"""Fused projections and pre-quantized activations on CPU (reference backend).

A QuantLinear with `parts` (q/k/v or gate/up stacked) must give exactly the bits of its parts
quantized and run one by one; the loader must fill each part from its checkpoint tensor; activations
handed over already quantized (quant/activation.py) must give the same output as quantizing inside
the linear; and a model built with fused projections must compute what separate projections compute.
"""

import pytest
import torch
import torch.nn.functional as F

from mixquant_serve.model.llama import FUSED_PROJECTIONS
from mixquant_serve.model.loader import _load_weights, checkpoint_targets
from mixquant_serve.quant import fp8, nvfp4
from mixquant_serve.quant.activation import rms_norm, rms_norm_for_linear, silu_mul, silu_mul_for_linear
from mixquant_serve.quant.linear import QuantLinear, quantize_activation

PARTS = (48, 16, 16)
IN_FEATURES = 64


def fused_and_separate(precisions: list[str], bias: bool = True) -> tuple[QuantLinear, list[QuantLinear]]:
    """A fused layer and one layer per part, with the same (differently scaled) weights per part."""
    g = torch.Generator().manual_seed(0)
    fused = QuantLinear(IN_FEATURES, sum(PARTS), bias=bias, parts=PARTS)
    separate = []
    for index, (size, magnitude) in enumerate(zip(PARTS, (1.0, 0.01, 30.0))):  # very different tensor amax
        layer = QuantLinear(IN_FEATURES, size, bias=bias)
        layer.weight.copy_(torch.randn(size, IN_FEATURES, generator=g) * magnitude)
        fused.weight[fused.part_rows(index)] = layer.weight
        if bias:
            layer.bias.copy_(torch.randn(size, generator=g))
            fused.bias[fused.part_rows(index)] = layer.bias
        separate.append(layer)
    for layer in [fused, *separate]:
        layer.prepare(precisions)
    return fused, separate


def test_fused_nvfp4_weight_has_the_bits_of_its_parts() -> None:
    fused, separate = fused_and_separate(["nvfp4"])
    whole = fused.quantized_weight("nvfp4")
    assert tuple(whole.global_scale.shape) == (sum(PARTS), 1)
    for index, layer in enumerate(separate):
        part = layer.quantized_weight("nvfp4")
        rows = fused.part_rows(index)
        assert torch.equal(whole.packed[rows], part.packed)
        assert torch.equal(whole.block_scale[rows].view(torch.uint8), part.block_scale.view(torch.uint8))
        assert torch.equal(whole.global_scale[rows], part.global_scale.expand(rows.stop - rows.start, 1))


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_fused_forward_equals_separate_forwards(precision: str) -> None:
    fused, separate = fused_and_separate(["bf16", precision])
    x = torch.randn(7, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    for p in ("bf16", precision):
        expected = torch.cat([layer(x, p) for layer in separate], dim=-1)
        assert torch.allclose(fused(x, p), expected, rtol=1e-6, atol=1e-6), p


def test_parts_are_checked() -> None:
    with pytest.raises(ValueError, match="parts must be positive sizes adding up to out_features=32"):
        QuantLinear(8, 32, parts=(16, 8))
    with pytest.raises(ValueError, match="parts must be positive"):
        QuantLinear(8, 32, parts=(32, 0))
    with pytest.raises(ValueError, match="index must be in 0..1"):
        QuantLinear(8, 32, parts=(16, 16)).part_rows(2)


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_pre_quantized_input_equals_quantizing_inside(precision: str) -> None:
    fused, _ = fused_and_separate([precision], bias=False)
    x = torch.randn(5, IN_FEATURES, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fused(quantize_activation(x, precision), precision), fused(x, precision))
    other = "nvfp4" if precision == "fp8" else "fp8"
    with pytest.raises(ValueError, match="pre-quantized x must be a 2-D"):
        fused(quantize_activation(x, other), precision)


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_activation_handoff_on_cpu_is_the_reference(precision: str) -> None:
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(6, 32, generator=g), torch.rand(32, generator=g) + 0.5
    gate_up = torch.randn(6, 64, generator=g)
    assert torch.equal(rms_norm_for_linear(x, weight, 1e-6, "bf16"), rms_norm(x, weight, 1e-6))
    assert torch.equal(silu_mul_for_linear(gate_up, "bf16"), F.silu(gate_up[:, :32]) * gate_up[:, 32:])
    normalized = rms_norm_for_linear(x, weight, 1e-6, precision)
    product = silu_mul_for_linear(gate_up, precision)
    for actual, dense in ((normalized, rms_norm(x, weight, 1e-6)), (product, silu_mul(gate_up))):
        expected = quantize_activation(dense, precision)
        decode = fp8.dequantize if precision == "fp8" else nvfp4.dequantize
        assert type(actual) is type(expected) and actual.shape == expected.shape
        assert torch.equal(decode(actual), decode(expected))


def test_loader_fills_fused_parts_from_checkpoint_names(tiny_llama) -> None:
    model, checkpoint = tiny_llama
    targets = checkpoint_targets(model)
    assert set(targets) == set(checkpoint)
    _load_weights(model, checkpoint.items())
    layer = model.model.layers[1]
    qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
    for index, name in enumerate(FUSED_PROJECTIONS["self_attn.qkv_proj"]):
        assert torch.equal(qkv.weight[qkv.part_rows(index)], checkpoint[f"model.layers.1.{name}.weight"])
    for index, name in enumerate(FUSED_PROJECTIONS["mlp.gate_up_proj"]):
        assert torch.equal(gate_up.weight[gate_up.part_rows(index)], checkpoint[f"model.layers.1.{name}.weight"])
    with pytest.raises(ValueError, match="has shape \\(3, 64\\), expected"):
        _load_weights(model, [("model.layers.0.self_attn.k_proj.weight", torch.zeros(3, 64))])
    with pytest.raises(ValueError, match="checkpoint lacks"):
        _load_weights(model, [(name, t) for name, t in checkpoint.items() if "up_proj" not in name])


@pytest.fixture
def tiny_llama():
    """A 2-layer Llama with GQA and random weights, and its checkpoint under Hugging Face names."""
    from mixquant_serve.model.config import ModelConfig
    from mixquant_serve.model.llama import LlamaForCausalLM

    config = ModelConfig.from_hf({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128, "tie_word_embeddings": False,
    })
    model = LlamaForCausalLM(config, torch.float32)
    g = torch.Generator().manual_seed(4)
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (96, 64), "mlp.up_proj": (96, 64),
              "mlp.down_proj": (64, 96)}
    checkpoint = {"model.embed_tokens.weight": torch.randn(50, 64, generator=g),
                  "model.norm.weight": torch.rand(64, generator=g), "lm_head.weight": torch.randn(50, 64, generator=g)}
    for i in range(2):
        for name, shape in shapes.items():
            checkpoint[f"model.layers.{i}.{name}.weight"] = torch.randn(*shape, generator=g) / 8
        for norm in ("input_layernorm", "post_attention_layernorm"):
            checkpoint[f"model.layers.{i}.{norm}.weight"] = torch.rand(64, generator=g) + 0.5
    return model, checkpoint
