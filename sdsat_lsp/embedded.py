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
    from .training.micro import train_micro
    from .training.tinymodel import save_tiny

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


# ----------------------------------------------------------------------------------------------
# Installing a trained model as the embedded default (scripts/build-embedded-model).

MODEL_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "sdsat.json", "model.safetensors.index.json")


def install_embedded(model_dir: Path, manifest: dict, target: Path = EMBEDDED_DIR, draft_store: str = "stdlib") -> Path:
    """Copy `model_dir`'s weights, tokenizer and card into `target` with `manifest.json` (how the
    model was made), replacing what was there in one rename. The card gains `draft_store`: the
    embedded model's adaptive tokens draft worse than its own training code does (see draftstore.py)."""
    import hashlib
    import json
    import shutil

    model_dir = Path(model_dir)
    tmp = target.with_name(target.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = sorted(p.name for p in model_dir.glob("model-*-of-*.safetensors"))  # save_pretrained(max_shard_size=...)
    for name in (*MODEL_FILES, *shards):
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, tmp / name)
    card = tmp / "sdsat.json"
    if card.exists():
        card.write_text(json.dumps({**json.loads(card.read_text()), "draft_store": draft_store}, indent=2) + "\n")
    manifest = dict(manifest, sha256={name.name: hashlib.sha256(name.read_bytes()).hexdigest()
                                      for name in sorted(tmp.iterdir())})
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for weights in tmp.glob("*.safetensors"):
        if weights.stat().st_size > 50 * 2**20:
            raise SystemExit(f"{weights} is {weights.stat().st_size / 2**20:.1f} MiB: over the 50 MB a commit may hold")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _run_summary(run: Path) -> dict:
    import json

    report = json.loads((run / "report.json").read_text())
    return {"command": (run / "command.txt").read_text().strip(), **{k: v for k, v in report.items()}}


def _eval_summary(path: Path) -> dict:
    import json

    result = json.loads(Path(path).read_text())
    return {k: v for k, v in result.items() if k != "examples"}


def main(argv=None) -> int:
    import argparse
    import datetime
    import platform

    p = argparse.ArgumentParser(prog="python -m sdsat_lsp.embedded")
    sub = p.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install", help="install a trained model folder as the embedded default, with a manifest")
    inst.add_argument("model_dir")
    inst.add_argument("--base-run", required=True, help="the base model's `sdsat-lsp train` output folder")
    inst.add_argument("--sdsat-run", required=True, help="the SDSAT fine-tuning's output folder")
    inst.add_argument("--eval-base", required=True)
    inst.add_argument("--eval-sdsat", required=True)
    inst.add_argument("--script", default="scripts/build-embedded-model")
    inst.add_argument("--trained-on", help="where the training ran, when not on this machine (hardware, torch and "
                      "transformers versions)")
    args = p.parse_args(argv)

    import torch
    import transformers

    base, sdsat = _run_summary(Path(args.base_run)), _run_summary(Path(args.sdsat_run))
    manifest = {
        "name": "sdsat-small-stdlib",
        "made_by": args.script,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": {"source": "CPython standard library (sdsat_lsp.corpus.split_files: 5% of files held out by path hash)",
                 "python": platform.python_version(), "files_hash": sdsat.get("files_hash"),
                 "held_out_files": sdsat.get("held_out_files"), "train_tokens": sdsat.get("train_tokens"),
                 "held_tokens": sdsat.get("held_tokens")}
        if "corpus" not in sdsat else
        {"source": "sdsat-lsp corpus: the standard library and the venv's package sources, whole packages held out",
         **sdsat["corpus"]},
        "seed": {"base": base.get("seed"), "sdsat": sdsat.get("seed")},
        "base_training": base,
        "sdsat_fine_tuning": sdsat,
        "eval_base": _eval_summary(Path(args.eval_base)),
        "eval_sdsat": _eval_summary(Path(args.eval_sdsat)),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if args.trained_on:
        manifest["trained_on"] = args.trained_on
    target = install_embedded(Path(args.model_dir), manifest)
    print(f"installed {args.model_dir} as {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
