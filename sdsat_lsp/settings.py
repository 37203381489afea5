"""The server's settings: one typed dataclass, camelCase on the wire, parsed and checked in one
place. To add a setting, see docs/extending.md."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from .backends import BACKENDS
from .decoding import DRAFT_LENGTHS, LOOKUP_NGRAM, TREE_NODES
from .decoding import MODES as DECODING_MODES
from .prompt import LINE_MODES

# Changing these reloads the model (or, for a remote backend, the tokenizer and the endpoint's checks).
RELOAD_KEYS = ("model", "quantize", "device", "dtype", "threads", "backend", "backend_url", "backend_model")

# The server flags of `sdsat-lsp` (cli.py) and their help: each sets the setting of its name at
# start-up (from_command_line); initializationOptions from the editor override them.
CLI_FLAGS = {
    "--model": "model folder or hub id (default: the embedded model)",
    "--quantize": "auto | none | nf4 | int8 | dynamic-int8",
    "--device": "auto | cpu | cuda | cuda:N",
    "--backend": "where completions are decoded: local (default) | vllm | openai (an OpenAI-compatible "
                 "completions endpoint at --backend-url serving --model)",
    "--backend-url": "the endpoint of --backend vllm/openai, e.g. http://127.0.0.1:8000",
    "--backend-model": "the name the endpoint serves the model under (default: the only one it lists)",
}


@dataclass
class Settings:
    """Server settings, camelCase on the wire (`maxTokens`), from initializationOptions and
    workspace/didChangeConfiguration (optionally nested under "sdsat")."""

    model: str = ""  # model folder or hub id; "" = the default model
    quantize: str = "auto"  # auto | none | nf4 | int8 | dynamic-int8 (see model.load_model)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    threads: int = 0  # torch CPU threads; 0 = torch's default
    k: int = 0  # adaptive tokens per draft block; 0 = the model card's
    mode: str = "fused"  # SDSAT decoding: fused | two-pass | ar (plain greedy)
    draft_length: str = "adaptive"  # adaptive | fixed (always k drafts; see engine.generate)
    lookup_ngram: int = LOOKUP_NGRAM  # draft from the context when the last n tokens occurred before; 0 = off
    draft_store: str = "auto"  # retrieve drafts from: auto (the model card's choice) | off | stdlib | a folder
    tree_nodes: int = TREE_NODES  # retrieved drafts verified per pass as a tree (greedy only); 0 = one continuation
    max_tokens: int = 64  # new tokens per completion
    time_budget_ms: int = 400  # past this, stop at the next newline; 0 = no budget
    deadline_ms: int = 2000  # past this, stop after the pass whatever the text (queue wait included); 0 = none
    line_mode: str = "auto"  # auto | single | multi
    fim: bool = True  # fill-in-the-middle (suffix first) when the model card has FIM ids
    token_healing: bool = True  # a prompt ending inside a token is continued from the token before (healing.py)
    max_prompt_tokens: int = 1024
    max_suffix_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = -1  # sampling seed; -1 = random
    kv_cache: bool = True  # per-document KV cache reuse (off: re-prefill every prompt)
    # After an edit above the cursor, keep the cached KV of the unchanged text after it, positions
    # shifted (RoPE), in chunks of at least this many tokens; 0 = off (re-prefill from the edit on).
    # An approximation: that KV was computed before the edit, so a completion can differ from a
    # fresh prefill's (kvshift.py; how often: docs/decoding.md).
    cache_shift: int = 0
    # The compiled forward (compiled.py), compiled in the background once the model is ready (eager
    # until then; cached on disk). The environment's SDSAT_LSP_COMPILE=0 changes this default.
    compile: bool = os.environ.get("SDSAT_LSP_COMPILE", "1") != "0"
    cache_budget_mb: int = 512  # KV cache memory across documents (LRU eviction)
    # After an answer, decode on while idle, up to this many tokens (to the end of the next line),
    # into the document's KV cache, so that the next suggestion is ready (prefetch.py); 0 = off.
    prefetch_tokens: int = 32
    enabled: bool = True
    # Where completions are decoded (backends/): local (this process) | vllm | openai (an
    # OpenAI-compatible completions endpoint at backendUrl serving the model named by `model`).
    backend: str = "local"
    backend_url: str = ""  # the endpoint's base URL, e.g. http://127.0.0.1:8000 (with or without /v1)
    backend_model: str = ""  # the name the endpoint serves the model under; "" = the only one it lists


_CHOICES = {"backend": BACKENDS, "mode": DECODING_MODES, "line_mode": LINE_MODES, "draft_length": DRAFT_LENGTHS}
_RANGES = {
    "threads": (0, 1024), "k": (0, 64), "lookup_ngram": (0, 16), "tree_nodes": (0, 64), "max_tokens": (1, 4096), "time_budget_ms": (0, 600_000),
    "deadline_ms": (0, 600_000),
    "max_prompt_tokens": (16, 1 << 20), "max_suffix_tokens": (0, 1 << 16), "temperature": (0.0, 100.0),
    "top_k": (0, 1 << 20), "top_p": (1e-6, 1.0), "seed": (-1, 2**62),
    # 64 GiB: room for the KV caches of a 7B model over hundreds of documents, and a bound that means
    # something (16 TiB was accepted). editors/vscode/package.json declares the same maximum
    # (tests/test_editor_settings.py keeps every declared range equal to the server's).
    "cache_budget_mb": (0, 65536),
    "prefetch_tokens": (0, 4096),
    "cache_shift": (0, 1 << 16),
}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def parse_settings(raw: Any, base: Settings) -> tuple[Settings, list[str]]:
    """`base` updated with the values in `raw` (a dict, camelCase or snake_case keys, possibly under
    "sdsat"); every value that is unknown, of the wrong type or out of range is listed in the
    returned problems and replaced by its default."""
    problems: list[str] = []
    if raw is None:
        return base, problems
    if isinstance(raw, dict) and isinstance(raw.get("sdsat"), dict):
        raw = raw["sdsat"]
    if not isinstance(raw, dict):
        return base, [f"settings must be an object, got {type(raw).__name__}"]
    defaults = Settings()
    by_wire = {camel(f.name): f.name for f in dataclasses.fields(Settings)}
    values = {}
    for key, value in raw.items():
        name = by_wire.get(key) or (key if key in by_wire.values() else None)
        if name is None:
            problems.append(f"unknown setting {key!r}")
            continue
        default = getattr(defaults, name)
        ok = _check_value(name, value, default)
        if ok is None:
            values[name] = float(value) if isinstance(default, float) else value
            if name == "model" and value is None:
                values[name] = ""
        else:
            problems.append(f"{camel(name)}: {ok}; using {default!r}")
            values[name] = default
    return dataclasses.replace(base, **values), problems


def _check_value(name: str, value: Any, default: Any) -> str | None:
    """None when `value` fits the setting, else what is wrong with it."""
    if name == "model" and value is None:
        return None
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            return f"expected true or false, got {value!r}"
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {value!r}"
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return f"expected a number, got {value!r}"
    elif kind is str and not isinstance(value, str):
        return f"expected a string, got {value!r}"
    if name in _CHOICES and value not in _CHOICES[name]:
        return f"expected one of {', '.join(_CHOICES[name])}, got {value!r}"
    if name in _RANGES:
        lo, hi = _RANGES[name]
        if not lo <= value <= hi:
            return f"expected {lo}..{hi}, got {value!r}"
    return None


def settings_to_wire(settings: Settings) -> dict:
    return {camel(k): v for k, v in dataclasses.asdict(settings).items()}


def from_command_line(args) -> Settings:
    """The defaults, with the CLI_FLAGS given on the command line (`args`, from argparse)."""
    names = (flag[2:].replace("-", "_") for flag in CLI_FLAGS)
    return dataclasses.replace(Settings(), **{name: getattr(args, name) for name in names if getattr(args, name, None)})
