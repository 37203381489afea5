"""Real code to benchmark, train and evaluate on: the CPython standard library on this machine.

Every list here is deterministic (sorted paths, seeded choices) so that figures from different
runs and machines are comparable, and the held-out split is a pure function of the path.
Building a training corpus (`sdsat-lsp corpus`: the venv's packages too, deduplicated, as token
shards) is training's: `sdsat_lsp/training/corpus.py`.
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import SdsatError

# Folders whose files are data-like, generated or huge; they teach a code model little.
_SKIPPED_PARTS = {"site-packages", "__pycache__", "idlelib", "lib2to3", "pydoc_data", "encodings"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(source: str | Path | None = None, max_bytes: int = 400_000) -> list[Path]:
    """Python files under `source` (default: the standard library), sorted, readable as UTF-8."""
    root = Path(source) if source is not None else stdlib_dir()
    if not root.is_dir():
        raise SdsatError(f"source folder {root} does not exist or is not a folder")
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if _SKIPPED_PARTS.intersection(rel) or not path.is_file():
            continue
        if path.stat().st_size > max_bytes or path.stat().st_size < 200:
            continue
        files.append(path)
    if not files:
        raise SdsatError(f"no Python files found under {root}")
    return files


class Cancelled(SdsatError):
    """A walk or a tokenization stopped because its result is no longer wanted."""


def bounded_python_files(root: Path, max_files: int, max_bytes: int, max_entries: int,
                         cancel: Callable[[], bool] | None = None, max_file_bytes: int = 400_000) -> list[Path]:
    """`python_files(root)` (the same files, in the same order) for a folder a client named: the walk
    stops with an SdsatError, saying which limit, past `max_entries` directory entries looked at,
    `max_files` files kept or `max_bytes` of them; `cancel()` true stops it with `Cancelled`. Links to
    folders are not followed (as rglob does not)."""
    files: list[Path] = []
    total = entries = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                listing = list(it)
        except OSError:
            continue  # unreadable: skipped, as rglob skips it
        for entry in listing:
            entries += 1
            if entries % 1000 == 0 and cancel is not None and cancel():
                raise Cancelled(f"listing {root} cancelled")
            if entries > max_entries:
                raise SdsatError(f"{root} holds more than {max_entries:,} files and folders; "
                                 "give a smaller folder (a project's source, not a home or a disk)")
            if entry.name in _SKIPPED_PARTS:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                if not entry.name.endswith(".py") or not entry.is_file():
                    continue
                size = entry.stat().st_size
            except OSError:
                continue
            if size > max_file_bytes or size < 200:
                continue
            files.append(Path(entry.path))
            total += size
            if len(files) > max_files:
                raise SdsatError(f"{root} holds more than {max_files:,} Python files; give a smaller folder")
            if total > max_bytes:
                raise SdsatError(f"the Python files under {root} exceed {max_bytes / 2**20:g} MiB; "
                                 "give a smaller folder")
    if not files:
        raise SdsatError(f"no Python files found under {root}")
    return sorted(files)


def is_held_out(path: Path, root: Path | None = None, fraction: float = 0.05) -> bool:
    """A fixed, path-determined evaluation split (the same on every machine with the same tree)."""
    rel = str(path.relative_to(root)) if root is not None else path.name
    digest = hashlib.sha256(rel.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def split_files(source: str | Path | None = None) -> tuple[Path, list[Path], list[Path]]:
    """(root, training files, held-out files) under `source` (default: the standard library)."""
    root = Path(source) if source is not None else stdlib_dir()
    files = python_files(root)
    held = [f for f in files if is_held_out(f, root)]
    return root, [f for f in files if not is_held_out(f, root)], held


def file_list_hash(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
    return h.hexdigest()[:16]


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


@dataclass(frozen=True)
class CodePrompt:
    path: str
    line: int
    text: str


def cut_prompts(
    n: int,
    source: str | Path | None = None,
    seed: int = 0,
    max_chars: int = 1500,
    min_chars: int = 200,
    files: list[Path] | None = None,
) -> list[CodePrompt]:
    """`n` prompts cut from real files at line starts: the text before a random line, up to `max_chars`.

    The cut is at a line start so the model continues a fresh line, the way an editor asks after
    Enter; the window start is moved forward to a line start too, so a prompt never opens mid-token.
    """
    files = files if files is not None else python_files(source)
    rng = random.Random(seed)
    prompts: list[CodePrompt] = []
    attempts = 0
    while len(prompts) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise SdsatError(f"could not cut {n} prompts of at least {min_chars} characters from the files")
        path = rng.choice(files)
        text = read_text(path)
        if not text:
            continue
        line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
        candidates = [s for s in line_starts if s >= min_chars and s < len(text) - 1]
        if not candidates:
            continue
        cut = rng.choice(candidates)
        start = max(0, cut - max_chars)
        if start > 0:
            nl = text.find("\n", start)
            start = nl + 1 if 0 <= nl < cut else start
        body = text[start:cut]
        if len(body) < min_chars // 2:
            continue
        prompts.append(CodePrompt(path=str(path), line=text.count("\n", 0, cut) + 1, text=body))
    return prompts


def token_stream(tokenizer, files: list[Path], cancel: Callable[[], bool] | None = None) -> list[int]:
    """The files' token ids, one after another, each followed by EOS (a document boundary);
    `cancel()` true stops it between files with `Cancelled`."""
    from . import faults

    stream: list[int] = []
    for path in files:
        if cancel is not None and cancel():
            raise Cancelled("tokenizing cancelled")
        faults.before_file()
        text = read_text(path)
        if text:
            stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return stream
