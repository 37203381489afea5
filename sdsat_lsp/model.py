"""Loading a causal LM for SDSAT: resolve the reference to a folder of safetensors weights, check
that it fits in memory, load it (quantized or not: the quantizers and why each is, or is not,
lossless for SDSAT are in quantize.py) with its tokenizer and SDSAT card.

This module knows nothing of decoding; it hands the engine an eval-mode model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import SdsatError
from .modelcard import ModelCard, read_model_card
from .quantize import nf4_shape_rule, nf4_skip_modules, packed_bytes, quantize_fp16_weights, quantize_rowwise_int8, quiet_bitsandbytes

log = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "nf4", "int8", "dynamic-int8", "dynamic-fp16")
_CPU_ONLY = ("dynamic-int8", "dynamic-fp16")  # fbgemm kernels, float32 activations
DTYPES = ("auto", "float32", "bfloat16", "float16")
# A hub id is "name" or "owner/name"; anything else that does not exist is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files worth fetching from the hub: never pickle weights.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Bytes per weight of a quantized matrix: NF4 packs 2 per byte plus one fp32 absmax per 64.
_QUANT_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1.0 + 4 / 64, "dynamic-int8": 1.0, "dynamic-fp16": 2.0}
# Room for activations, the KV cache of a few documents and the allocator.
HEADROOM = 1.15
_HEADROOM_BYTES = 256 << 20

# Hub downloads happen only when the user asked for them (`sdsat-lsp --allow-download`, which sets
# this variable for the process and the servers it starts): a model setting comes from an editor's
# or a project's settings, and must not make the server fetch gigabytes. Its value: the most bytes
# one model may download.
DOWNLOAD_CAP_ENV = "SDSAT_LSP_DOWNLOAD_CAP_BYTES"


def download_cap_bytes() -> int | None:
    """The most one model may download, or None when downloads are not allowed."""
    value = os.environ.get(DOWNLOAD_CAP_ENV, "")
    return int(value) if value.isdigit() else None


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM in eval mode
    tokenizer: Any  # a transformers tokenizer
    card: ModelCard  # adaptive ids, k, FIM ids, context length
    ref: str  # what was asked for (folder or hub id)
    device: str  # "cpu", "cuda", "cuda:0"
    quantize: str  # the quantization applied ("none", "nf4", "int8", "dynamic-int8", "dynamic-fp16")
    dtype: str  # "float32", "bfloat16", "float16": the dtype of activations and unquantized weights
    load_ms: float
    weight_bytes: int = 0  # parameters and buffers as loaded
    folder: str = ""  # the local folder the files came from (a hub id's snapshot)
    # Modules left in `dtype` because the quantization kernel cannot take their shapes (nf4 only).
    unquantized: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Settings.


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; a CUDA request without CUDA is an error."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise SdsatError(
                f"device {device!r} asked for, but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu"
            )
        return device
    raise SdsatError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def resolve_quantization(quantize: str, device: str, dtype: str = "auto") -> str:
    if quantize not in QUANTIZATIONS:
        raise SdsatError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantize == "auto":
        # NF4 is the GPU path; on CPU bitsandbytes is slower than fp32, while fbgemm fp16 weights
        # are about 2x faster than fp32 and lossless (float32 activations only: an explicit bf16
        # request means unquantized bf16).
        if device.startswith("cuda"):
            return "nf4"
        return "dynamic-fp16" if dtype in ("auto", "float32") else "none"
    if quantize in _CPU_ONLY and device.startswith("cuda"):
        raise SdsatError(f"{quantize} runs on CPU only (fbgemm kernels); on a GPU use nf4 or int8")
    return quantize


def resolve_dtype(dtype: str, device: str, quantize: str) -> str:
    if dtype not in DTYPES:
        raise SdsatError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    cuda = device.startswith("cuda")
    if dtype == "auto":
        if not cuda:
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype == "float16" and not cuda:
        raise SdsatError("float16 needs a CUDA GPU (CPUs here compute it slowly and lossily); use float32 or bfloat16")
    if quantize in _CPU_ONLY and dtype != "float32":
        raise SdsatError(f"{quantize} computes in float32 (fbgemm); got dtype {dtype}: drop --dtype or use quantize none")
    return dtype


# ----------------------------------------------------------------------------------------------
# Finding the weights.


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "~", os.sep)) or ref.count("/") > 1 or "\\" in ref or not _HUB_ID.match(ref)


def resolve_folder(ref: str | os.PathLike, max_download_bytes: int | None = -1) -> Path:
    """The local folder holding the model: `ref` itself, or the hub cache's snapshot of a hub id.
    A snapshot missing from the cache is downloaded (safetensors only, after a size check) only
    when downloads are allowed: `max_download_bytes` (None: not allowed; default:
    `download_cap_bytes()`)."""
    if max_download_bytes == -1:
        max_download_bytes = download_cap_bytes()
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        hint = " (a GGUF file: convert it with sdsat_lsp.tools.gguf.convert_gguf_to_safetensors first)" if path.suffix == ".gguf" else ""
        raise SdsatError(f"{text} is a file; pass the folder that holds config.json and the weights{hint}")
    if _looks_like_path(text):
        raise SdsatError(f"model folder {text} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except (OSError, ValueError):
        pass  # not in the cache
    if max_download_bytes is None:
        raise SdsatError(
            f"{text} is not a local folder and not in the Hugging Face cache; downloading it needs "
            f"`sdsat-lsp --allow-download` (its size is checked first), or download it yourself and pass the folder")
    try:
        _check_download_size(text, max_download_bytes)
        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
    except RepositoryNotFoundError as exc:
        raise SdsatError(
            f"{text}: no such model on the Hugging Face hub, or it is gated/private (log in with `hf auth login`)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise SdsatError(
            f"{text} is not a local folder and not in the Hugging Face cache, and the hub cannot be reached "
            f"({type(exc).__name__}); download it on a machine with network and pass the folder"
        ) from exc


def _check_download_size(repo: str, max_bytes: int) -> None:
    """Refuse a download bigger than `max_bytes` or than the free space of the hub cache."""
    import fnmatch
    import shutil

    from huggingface_hub import HfApi, constants

    info = HfApi().model_info(repo, files_metadata=True)
    need = sum(f.size or 0 for f in info.siblings or ()
               if any(fnmatch.fnmatch(f.rfilename, pattern) for pattern in _HUB_PATTERNS))
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if need > max_bytes:
        raise SdsatError(f"{repo} would download {_gib(need)}, more than the {_gib(max_bytes)} allowed "
                         "(raise it with --max-download-gb)")
    if need > free:
        raise SdsatError(f"{repo} would download {_gib(need)}, but {cache} has only {_gib(free)} free")
    log.info("downloading %s (%s) into %s", repo, _gib(need), cache)


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickles:
        raise SdsatError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); pickle files can run code when "
            f"loaded, so only safetensors are accepted. Convert once where you trust the file: "
            f"AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)"
        )
    raise SdsatError(f"{folder} holds no *.safetensors weights (only safetensors are read, or fetched from the hub)")


# ----------------------------------------------------------------------------------------------
# Memory: checked before loading, so that a model too big fails with a message, not the OOM killer.


def _header_shapes(files: list[Path]) -> dict[str, list[int]]:
    """name -> shape, from the safetensors file headers (no weights read)."""
    import json
    import struct

    out = {}
    for f in files:
        with open(f, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        out.update((name, list(info["shape"])) for name, info in header.items() if name != "__metadata__")
    return out


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[int, int]]:
    """name -> (element count, number of dimensions), from the file headers (no weights read)."""
    out = {}
    for name, shape in _header_shapes(files).items():
        count = 1
        for d in shape:
            count *= d
        out[name] = (count, len(shape))
    return out


def estimate_load_bytes(folder: Path, quantize: str, dtype: str) -> int:
    """Peak bytes to load and run: weights at their loaded size (matrices quantized, embeddings,
    norms and, for bitsandbytes, lm_head kept in `dtype`), plus headroom."""
    dtype_bytes = 4 if dtype == "float32" else 2
    total = 0.0
    for name, (count, ndim) in _tensor_shapes(weight_files(folder)).items():
        if quantize in _CPU_ONLY:
            # Loaded in fp32 first, then each Linear is swapped; the fp32 copy is the peak.
            total += count * 4
        elif quantize in ("nf4", "int8") and ndim == 2 and "embed" not in name and "lm_head" not in name:
            total += count * _QUANT_BYTES[quantize]
        else:
            total += count * dtype_bytes
    return int(total * HEADROOM) + _HEADROOM_BYTES


def available_memory(device: str) -> int:
    """Bytes free where the weights will live (RAM for CPU, the GPU's free memory for CUDA)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------------
# Loading.


def _card(folder: Path, ref: str, config, vocab: int, adaptive_ids, k) -> ModelCard:
    card = read_model_card(folder) or read_model_card(ref)
    card = dataclasses.replace(card) if card else ModelCard(adaptive_ids=[])  # never edit KNOWN_CARDS
    if adaptive_ids is not None:
        card.adaptive_ids = [int(i) for i in adaptive_ids]
    if k is not None:
        card.k = int(k)
    if card.k < 1:
        raise SdsatError(f"k must be at least 1 (got {card.k})")
    bad = [i for i in card.adaptive_ids if not 0 <= i < vocab]
    if bad:
        raise SdsatError(f"adaptive id(s) {bad} outside the model's vocabulary (0..{vocab - 1})")
    card.context_length = card.context_length or getattr(config, "max_position_embeddings", None)
    return card


def load_model(
    ref: str | os.PathLike,
    *,
    quantize: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    adaptive_ids: list[int] | None = None,
    k: int | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a folder or a hub id, quantized as asked.
    Explicit `adaptive_ids`/`k` override the model card; with neither, SDSAT ids are empty (AR only)."""
    started = time.perf_counter()
    device = resolve_device(device)
    quantize = resolve_quantization(quantize, device, dtype)
    dtype = resolve_dtype(dtype, device, quantize)
    folder = resolve_folder(ref)

    need, free = estimate_load_bytes(folder, quantize, dtype), available_memory(device)
    if need > free:
        raise SdsatError(
            f"{os.fspath(ref)} needs about {_gib(need)} on {device} with quantization {quantize} ({dtype}), "
            f"but only {_gib(free)} is available; close other programs"
            + ("" if quantize == "nf4" else " or choose nf4, the smallest")
        )
    log.info("loading %s from %s: %s, %s on %s (about %s)", os.fspath(ref), folder, quantize, dtype, device, _gib(need))

    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = dict(use_safetensors=True, dtype=torch_dtype)
    unquantized: list[str] = []
    if quantize == "nf4":
        skip = None
        try:
            from transformers import AutoConfig

            skip, unquantized = nf4_skip_modules(folder, AutoConfig.from_pretrained(folder))
        except (OSError, ValueError, KeyError) as exc:
            raise SdsatError(f"could not read the model configuration in {folder}: {exc}") from exc
        if unquantized:
            rows, cols = nf4_shape_rule()
            log.warning(
                "nf4: %d module(s) stay unquantized (%s): bitsandbytes' 4-bit kernel needs out %% %d == 0 and "
                "in %% %d == 0: %s", len(unquantized), dtype, rows, cols, ", ".join(unquantized))
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype,
            llm_int8_skip_modules=skip if unquantized else None,
        )
    elif quantize == "int8":
        # Threshold 0: no fp16 outlier columns shared across a pass's rows (see the docstring).
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
        quiet_bitsandbytes()
    if quantize in ("nf4", "int8") or device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        # trust_remote_code=False: a model folder's own Python (auto_map) never runs.
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise SdsatError(f"could not load a causal LM from {folder}: {exc}") from exc
    if quantize == "dynamic-int8":
        quantize_rowwise_int8(model)
    elif quantize == "dynamic-fp16":
        quantize_fp16_weights(model)
    model.eval()

    card = _card(folder, os.fspath(ref), model.config, model.get_input_embeddings().weight.shape[0], adaptive_ids, k)
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    weight_bytes += sum(packed_bytes(m) for m in model.modules())  # fbgemm's packed weights are not parameters
    load_ms = (time.perf_counter() - started) * 1e3
    log.info("loaded %s in %.0f ms: %s of weights", os.fspath(ref), load_ms, _gib(weight_bytes))
    return LoadedModel(model, tokenizer, card, os.fspath(ref), device, quantize, dtype, load_ms, weight_bytes,
                       os.fspath(folder), unquantized)
