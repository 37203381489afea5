"""The model a user gets without asking for one.

The embedded default model ships inside the package (`sdsat_lsp/models/default`, safetensors with
a manifest of how it was made). Until it exists, a micro demo model is built on first use (about
15 s on 2 cores, cached) so that every command still runs offline; it shows the machinery, not
useful completions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).parent / "models" / "default"
DEMO_VERSION = "micro-v2"  # v2: no FIM ids (the demo never learned to infill)


def embedded_model_dir() -> Path | None:
    return EMBEDDED_DIR if any(EMBEDDED_DIR.glob("*.safetensors")) else None


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdsat-lsp"


def demo_model_dir() -> Path:
    """The micro demo model's folder, built once (atomically, so a killed build leaves nothing)."""
    folder = _cache_root() / DEMO_VERSION
    if any(folder.glob("*.safetensors")):
        return folder
    from .tinymodel import save_tiny, train_micro

    log.warning("no embedded model yet: building the micro demo model in %s (about 15 s, once)", folder)
    model, tokenizer, _ = train_micro()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    save_tiny(model, tokenizer, tmp, k=5, fim=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first
        pass
    return folder


def default_model_ref() -> Path:
    return embedded_model_dir() or demo_model_dir()


def resolve_model(ref=None, **load_options):
    """Load `ref`, or the default model when it is None (see `model.load_model` for options)."""
    from .model import load_model

    return load_model(ref if ref else default_model_ref(), **load_options)
