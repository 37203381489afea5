"""Real code to benchmark, train and evaluate on: the CPython standard library on this machine.

Every list here is deterministic (sorted paths, seeded choices) so that figures from different
runs and machines are comparable, and the held-out split is a pure function of the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sysconfig
import time
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


# ----------------------------------------------------------------------------------------------
# `sdsat-lsp corpus`: the standard library plus the Python sources of the packages installed in
# the project's virtual environment, cleaned, deduplicated, split by whole packages and written
# as token shards with a manifest. Nothing is downloaded: the sources are what `pip install`
# already put on this machine, so the same venv gives the same corpus (the manifest's hash says so).

# Copies of other projects inside a package: they would count one project twice, under a name
# that is not its own.
VENDORED_PARTS = {"_vendor", "vendor", "vendored", "_vendored", "third_party", "thirdparty", "_thirdparty",
                  "extern", "externals", "_vendored_packages", "_distutils"}
_CORPUS_SKIPPED_PARTS = {"__pycache__", "site-packages", "idlelib", "lib2to3", "pydoc_data", "encodings"}
# Looked for in the comments of a file's first lines only: a docstring may say "generated by" of its data.
_GENERATED = re.compile(r"auto-?generated|automatically generated|generated by|do not edit|@generated", re.I)
MAX_FILE_BYTES = 1_000_000
MIN_FILE_BYTES = 200


@dataclass(frozen=True)
class SourceFile:
    package: str  # "stdlib/json", "site/torch": the unit of the held-out split
    rel: str  # path inside its root, "/"-separated
    path: Path


def venv_site_packages() -> Path:
    """The running interpreter's site-packages: the project's .venv when run as .venv/bin/sdsat-lsp."""
    return Path(sysconfig.get_paths()["purelib"])


def _package_of(rel_parts: tuple[str, ...]) -> str:
    head = rel_parts[0]
    return head[:-3] if head.endswith(".py") else head


def exclusion_reason(path: Path, rel_parts: tuple[str, ...], text: str | None, size: int) -> str | None:
    """Why a file stays out of the corpus, or None. Reasons are the manifest's exclusion counts."""
    if _CORPUS_SKIPPED_PARTS.intersection(rel_parts[:-1]) or rel_parts[0].endswith(".dist-info"):
        return "skipped_folder"
    if VENDORED_PARTS.intersection(p.lower() for p in rel_parts[:-1]):
        return "vendored"
    if size > MAX_FILE_BYTES:
        return "over_1mb"
    if size < MIN_FILE_BYTES:
        return "tiny"
    if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
        return "generated"
    if text is None:
        return "not_utf8"
    if any(_GENERATED.search(line) for line in text.splitlines()[:30] if line.lstrip().startswith("#")):
        return "generated"
    lines = text.count("\n") + 1
    longest = max((len(line) for line in text.splitlines()), default=0)
    if longest > 3000 or len(text) / lines > 120:
        return "data_blob"  # tables, embedded binaries, minified data: little code to learn from
    return None


def _scan(root: Path, prefix: str, exclusions: dict[str, int]) -> list[tuple[SourceFile, str]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel_parts = path.relative_to(root).parts
        if rel_parts[0].startswith(("__editable__", "_distutils_hack")) or not path.is_file():
            continue
        size = path.stat().st_size
        text = read_text(path) if MIN_FILE_BYTES <= size <= MAX_FILE_BYTES else ""
        reason = exclusion_reason(path, rel_parts, text, size)
        if reason:
            exclusions[reason] = exclusions.get(reason, 0) + 1
            continue
        found.append((SourceFile(f"{prefix}/{_package_of(rel_parts)}", "/".join(rel_parts), path), text))
    return found


# -- near-duplicates: MinHash over word 5-gram shingles, LSH bands for candidates ---------------

_WORD = re.compile(r"\w+|[^\w\s]")
_MINHASH_PERMS = 64
_BANDS = 16  # 16 bands x 4 rows: pairs above Jaccard ~0.5 become candidates, then are checked


def _token_hash(word: str, cache: dict[str, int]) -> int:
    h = cache.get(word)
    if h is None:
        h = cache[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return h


def minhash_signature(text: str, cache: dict[str, int], shingle: int = 5):
    """64 minima of a seeded family of hash functions over the text's word `shingle`-grams.
    Two files agree on a signature entry with probability equal to their shingle-set Jaccard."""
    import numpy as np

    words = np.array([_token_hash(w, cache) for w in _WORD.findall(text)], dtype=np.uint64)
    if len(words) < shingle:
        words = np.pad(words, (0, shingle - len(words)))
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps: that is the hash
        grams = np.zeros(len(words) - shingle + 1, dtype=np.uint64)
        for j in range(shingle):
            grams = grams * np.uint64(1_000_003) + words[j : len(words) - shingle + 1 + j]
        grams = np.unique(grams)
        rng = np.random.default_rng(12345)
        a = rng.integers(1, 2**63, size=_MINHASH_PERMS, dtype=np.uint64) | np.uint64(1)
        b = rng.integers(0, 2**63, size=_MINHASH_PERMS, dtype=np.uint64)
        sig = np.full(_MINHASH_PERMS, np.iinfo(np.uint64).max, dtype=np.uint64)
        for lo in range(0, len(grams), 65536):
            chunk = grams[lo : lo + 65536, None] * a[None] + b[None]
            sig = np.minimum(sig, chunk.min(axis=0))
    return sig


def deduplicate(files: list[tuple[SourceFile, str]], threshold: float = 0.8, progress=None):
    """(kept, exact duplicates, near duplicates): the first of each group in the given (sorted)
    order is kept. Exact: same text once trailing whitespace is stripped. Near: estimated shingle
    Jaccard >= `threshold` (transformers' "Copied from" modeling files, forks of one module)."""
    seen: set[bytes] = set()
    buckets: dict[tuple[int, bytes], list[int]] = {}
    sigs = []
    kept, exact, near = [], 0, 0
    cache: dict[str, int] = {}
    rows = _MINHASH_PERMS // _BANDS
    for n, (src, text) in enumerate(files):
        if progress and n % 500 == 0:
            progress(f"dedup {n}/{len(files)}")
        digest = hashlib.sha256("\n".join(line.rstrip() for line in text.splitlines()).strip().encode()).digest()
        if digest in seen:
            exact += 1
            continue
        seen.add(digest)
        sig = minhash_signature(text, cache)
        keys = [(band, sig[band * rows : (band + 1) * rows].tobytes()) for band in range(_BANDS)]
        candidates = {i for key in keys for i in buckets.get(key, ())}
        if any(float((sigs[i] == sig).mean()) >= threshold for i in candidates):
            near += 1
            continue
        index = len(sigs)
        sigs.append(sig)
        for key in keys:
            buckets.setdefault(key, []).append(index)
        kept.append((src, text))
    return kept, exact, near


def held_out_packages(bytes_per_package: dict[str, int], seed: int, fraction: float = 0.05,
                      max_share: float = 0.02) -> list[str]:
    """Whole packages held out: in the order of sha256(seed/name), each package no bigger than
    `max_share` of the corpus is held out until `fraction` of the bytes are (giants like torch
    always train: holding one out would take a third of the corpus)."""
    total = sum(bytes_per_package.values())
    order = sorted(bytes_per_package, key=lambda name: hashlib.sha256(f"{seed}/{name}".encode()).hexdigest())
    held, held_bytes = [], 0
    for name in order:
        if held_bytes >= fraction * total:
            break
        if bytes_per_package[name] <= max_share * total:
            held.append(name)
            held_bytes += bytes_per_package[name]
    return sorted(held)


# -- fill-in-the-middle documents ------------------------------------------------------------


def fim_document(text: str, tokenizer, fim_ids: dict[str, int], rng: random.Random, spm_rate: float = 0.5) -> list[int]:
    """One FIM example from `text` with two character-level cut points (Bavarian et al. 2022):
    SPM `<prefix><suffix> suffix <middle> prefix middle` (the server's prompt order, see
    prompt.build_prompt) with probability `spm_rate`, else PSM `<prefix> prefix <suffix> suffix
    <middle> middle`. Each part is tokenized alone, as the server tokenizes the text around a cursor."""
    from .prompt import encode

    i, j = sorted(rng.randrange(0, len(text) + 1) for _ in range(2))
    prefix, middle, suffix = encode(tokenizer, text[:i]), encode(tokenizer, text[i:j]), encode(tokenizer, text[j:])
    if rng.random() < spm_rate:
        return [fim_ids["prefix"], fim_ids["suffix"]] + suffix + [fim_ids["middle"]] + prefix + middle
    return [fim_ids["prefix"]] + prefix + [fim_ids["suffix"]] + suffix + [fim_ids["middle"]] + middle


def _segments(text: str, max_chars: int) -> list[str]:
    """`text` cut at line starts into pieces of at most about `max_chars` (a long line stays whole)."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def document_tokens(text: str, tokenizer, eos: int, fim_ids: dict[str, int] | None, rng: random.Random,
                    fim_rate: float, spm_rate: float, fim_chars: int) -> list[int]:
    """A file's training tokens: with FIM, the file is cut at line starts into pieces shorter than
    a training window (context-level FIM: a window then holds whole examples), and each piece is
    a FIM example with probability `fim_rate`; runs of plain pieces stay one plain text."""
    from .prompt import encode

    if not fim_ids or fim_rate <= 0:
        return encode(tokenizer, text) + [eos]
    out: list[int] = []
    plain = ""
    for piece in _segments(text, fim_chars):
        if rng.random() < fim_rate:
            if plain:
                out += encode(tokenizer, plain) + [eos]
                plain = ""
            out += fim_document(piece, tokenizer, fim_ids, rng, spm_rate) + [eos]
        else:
            plain += piece
    if plain:
        out += encode(tokenizer, plain) + [eos]
    return out


# -- the command ------------------------------------------------------------------------------


def collect_corpus(stdlib: Path | None, site: Path | None, only: list[str] | None = None, progress=print):
    """(files with text, exclusion counts) from the roots, sorted by root, package, path."""
    exclusions: dict[str, int] = {}
    files = []
    for root, prefix in ((stdlib, "stdlib"), (site, "site")):
        if root is None:
            continue
        if not root.is_dir():
            raise SdsatError(f"source folder {root} does not exist or is not a folder")
        progress(f"scanning {root}")
        files += _scan(root, prefix, exclusions)
    if only:
        wanted = set(only)
        files = [f for f in files if f[0].package in wanted or f[0].package.split("/", 1)[1] in wanted]
    # The standard library first: of two copies, the original is the one kept.
    files.sort(key=lambda f: (not f[0].package.startswith("stdlib/"), f[0].package, f[0].rel))
    if not files:
        raise SdsatError("no Python files left in the corpus (check --packages and the roots)")
    return files, exclusions


def build_corpus(out: Path, *, stdlib: Path | None, site: Path | None, seed: int = 0, packages: list[str] | None = None,
                 vocab_size: int = 16384, tokenizer_dir: Path | None = None, tokenizer_bytes: int = 40_000_000,
                 fim_rate: float = 0.5, spm_rate: float = 0.5, fim_chars: int = 3000, held_fraction: float = 0.05,
                 near_threshold: float = 0.8, shard_tokens: int = 1 << 25, max_train_tokens: int | None = None,
                 slot_tokens: int = 8, command: str = "", progress=None, vocab_sweep: list[int] | None = None,
                 compress: bool = False, held_max_share: float = 0.02) -> dict:
    """Everything `sdsat-lsp corpus` writes into `out`; returns the manifest."""
    import json

    import numpy as np

    progress = progress or (lambda msg: None)
    out.mkdir(parents=True, exist_ok=True)
    files, exclusions = collect_corpus(stdlib, site, packages, progress)
    progress(f"{len(files)} files after exclusions {exclusions}")
    files, exact, near = deduplicate(files, near_threshold, progress)
    exclusions.update(exact_duplicate=exact, near_duplicate=near)
    progress(f"{len(files)} files after removing {exact} exact and {near} near duplicates")
    size: dict[str, int] = {}
    for src, text in files:
        size[src.package] = size.get(src.package, 0) + len(text.encode())
    held = set(held_out_packages(size, seed, held_fraction, held_max_share))
    train_files = [f for f in files if f[0].package not in held]
    held_files = [f for f in files if f[0].package in held]
    if not held_files or not train_files:
        raise SdsatError("the corpus is too small to hold out a whole package: add packages")

    from .training.tinymodel import ADAPTIVE_TOKEN, FIM_TOKENS, slot_token_names, train_tokenizer

    # A fixed sample of the training split (every n-th file), not all of it: BPE merges settle
    # long before 200 MB, and training on it all would take most of the command's time.
    total = sum(len(t) for _, t in train_files)
    stride = max(1, round(total / tokenizer_bytes))
    texts = [t for _, t in train_files[::stride]]
    sweep = []
    for size in vocab_sweep or []:
        progress(f"vocabulary sweep: a {size}-token BPE on {len(texts)} files")
        started = time.perf_counter()
        candidate = train_tokenizer(vocab_size=size, texts=texts, slot_tokens=slot_tokens)
        seconds = time.perf_counter() - started
        held_texts = [t for _, t in held_files]
        tokens = sum(len(e.ids) for e in candidate.backend_tokenizer.encode_batch(held_texts, add_special_tokens=False))
        lines = sum(t.count("\n") + 1 for t in held_texts)
        sweep.append({"vocab_size": size, "held_tokens": tokens, "held_lines": lines,
                      "tokens_per_line": round(tokens / lines, 4), "chars_per_token": round(sum(map(len, held_texts)) / tokens, 4),
                      "train_seconds": round(seconds, 1)})
        progress(f"vocabulary sweep: {sweep[-1]}")
    if sweep:
        (out / "vocab_sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        progress(f"training a {vocab_size}-token BPE on {len(texts)} files ({sum(map(len, texts)) >> 20} MiB)")
        tokenizer = train_tokenizer(vocab_size=vocab_size, texts=texts, slot_tokens=slot_tokens)
    tokenizer.save_pretrained(out / "tokenizer")
    fim_ids = {role: tokenizer.convert_tokens_to_ids(tok) for role, tok in FIM_TOKENS.items()}
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32

    rng = random.Random(seed)
    shards, tokens_per_package = [], {}
    for split, split_files_ in (("train", train_files), ("held", held_files)):
        buffer: list[int] = []
        written = 0

        def flush(final: bool = False):
            nonlocal buffer
            while len(buffer) >= shard_tokens or (final and buffer):
                chunk = np.asarray(buffer[:shard_tokens], dtype=dtype)
                name = f"{split}-{sum(1 for s in shards if s['split'] == split):03d}.npy"
                _save_shard(out / name, chunk, compress)
                shards.append({"file": name, "split": split, "tokens": int(len(chunk)),
                               "sha256": hashlib.sha256(chunk.tobytes()).hexdigest()[:16]})
                buffer = buffer[shard_tokens:]

        for n, (src, text) in enumerate(split_files_):
            if n % 500 == 0:
                progress(f"tokenizing {split}: {n}/{len(split_files_)} files, {written + len(buffer)} tokens")
            if split == "train" and max_train_tokens and written + len(buffer) >= max_train_tokens:
                exclusions["over_token_cap"] = exclusions.get("over_token_cap", 0) + len(split_files_) - n
                break
            # Held-out text stays plain: its loss is the real-token loss; eval has its own FIM task.
            ids = document_tokens(text, tokenizer, eos, fim_ids if split == "train" else None, rng,
                                  fim_rate, spm_rate, fim_chars)
            buffer += ids
            tokens_per_package[src.package] = tokens_per_package.get(src.package, 0) + len(ids)
            flush()
            written = sum(s["tokens"] for s in shards if s["split"] == split)
        flush(final=True)

    (out / "files.txt").write_text("".join(f"{s.package}\t{s.rel}\n" for s, _ in train_files))
    (out / "held_files.txt").write_text("".join(f"{s.package}\t{s.rel}\n" for s, _ in held_files))
    all_sources = [s for s, _ in files]
    h = hashlib.sha256()
    for s in all_sources:
        h.update(f"{s.package}/{s.rel}".encode() + b"\0")
    import sys as _sys

    manifest = {
        "command": command,
        "seed": seed,
        "python": _sys.version.split()[0],
        "roots": {"stdlib": str(stdlib) if stdlib else None, "site": str(site) if site else None},
        "packages": packages,
        "files": len(files),
        "train_files": len(train_files),
        "held_files": len(held_files),
        "file_list_hash": h.hexdigest()[:16],
        "held_out_packages": sorted(held),
        "held_out_rule": f"packages in sha256('{seed}/'+name) order, each <= {held_max_share:.0%} of the bytes, "
                         f"until {held_fraction:.0%} of the bytes",
        "held_roots": sorted({str(s.path.parents[len(s.rel.split('/')) - 2]) if '/' in s.rel else str(s.path)
                              for s, _ in held_files}),
        "exclusions": exclusions,
        "near_duplicate": {"method": "MinHash, 64 hashes of word 5-gram shingles, LSH 16x4", "threshold": near_threshold},
        "tokens_per_package": dict(sorted(tokens_per_package.items())),
        "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
        "held_tokens": sum(s["tokens"] for s in shards if s["split"] == "held"),
        "max_train_tokens": max_train_tokens,
        "dtype": np.dtype(dtype).name,
        "compressed": compress,
        "vocab_sweep": sweep,
        "shards": shards,
        "tokenizer": {"vocab_size": len(tokenizer), "trained_here": tokenizer_dir is None,
                      "sample_bytes": tokenizer_bytes, "eos": eos, "fim": fim_ids,
                      "adaptive": tokenizer.convert_tokens_to_ids(ADAPTIVE_TOKEN),
                      "adaptive_slots": [tokenizer.convert_tokens_to_ids(t) for t in slot_token_names(slot_tokens)]},
        "fim": {"rate": fim_rate, "spm_rate": spm_rate, "piece_chars": fim_chars, "cut": "character level",
                "order": "SPM <fim_prefix><fim_suffix> suffix <fim_middle> prefix middle; PSM <fim_prefix> prefix "
                         "<fim_suffix> suffix <fim_middle> middle; EOS after each example"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"wrote {len(shards)} shards, {manifest['train_tokens']} training and {manifest['held_tokens']} "
             f"held-out tokens to {out}")
    return manifest


def _save_shard(path: Path, chunk, compress: bool) -> None:
    """`.npy`, or with `compress` `.npy.xz` (token ids shrink to about a fifth: what lets a corpus of
    ~45M tokens travel to a GPU machine within a 64 MiB transfer)."""
    import io
    import lzma

    import numpy as np

    if not compress:
        np.save(path, chunk)
        return
    buffer = io.BytesIO()
    np.save(buffer, chunk)
    Path(f"{path}.xz").write_bytes(lzma.compress(buffer.getvalue(), preset=1))


def _load_shard(path: Path):
    import io
    import lzma

    import numpy as np

    if path.is_file():
        return np.load(path)
    packed = Path(f"{path}.xz")
    if not packed.is_file():
        raise SdsatError(f"corpus shard {path} (or {packed.name}) is missing")
    return np.load(io.BytesIO(lzma.decompress(packed.read_bytes())))


def load_corpus(folder: str | Path) -> dict:
    """The shards of a `sdsat-lsp corpus` folder as one training and one held-out tensor (int32),
    in the shape `sdsat-lsp train` caches its data."""
    import json

    import numpy as np
    import torch

    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise SdsatError(f"{folder} holds no manifest.json: build it with `sdsat-lsp corpus --out {folder}`")
    manifest = json.loads(path.read_text())
    parts: dict[str, list] = {"train": [], "held": []}
    for shard in manifest["shards"]:
        parts[shard["split"]].append(_load_shard(folder / shard["file"]).astype(np.int32))
    return {
        "train": torch.from_numpy(np.concatenate(parts["train"])),
        "held": torch.from_numpy(np.concatenate(parts["held"])),
        "files_hash": manifest["file_list_hash"],
        "held_files": [line.split("\t", 1)[1] for line in (folder / "held_files.txt").read_text().splitlines()],
        "manifest": manifest,
    }


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="folder for the shards, tokenizer/ and manifest.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out packages and of the FIM cuts")
    p.add_argument("--stdlib", default="auto", help="standard library folder (auto: this Python's; none: leave out)")
    p.add_argument("--site-packages", default="auto",
                   help="site-packages whose sources join the corpus (auto: the running venv's; none: leave out)")
    p.add_argument("--packages", help="comma-separated package names to keep (e.g. json,email,pygls): a small corpus")
    p.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary when training a tokenizer")
    p.add_argument("--tokenizer", help="use this tokenizer folder instead of training one")
    p.add_argument("--tokenizer-mb", type=float, default=40, help="MiB of training text the BPE is trained on")
    p.add_argument("--adaptive-slots", type=int, default=8, help="distinct adaptive-token ids to reserve (one per slot)")
    p.add_argument("--fim-rate", type=float, default=0.5, help="share of training pieces made FIM examples")
    p.add_argument("--spm-rate", type=float, default=0.5, help="share of FIM examples in SPM order (the rest PSM)")
    p.add_argument("--fim-chars", type=int, default=3000, help="FIM pieces are at most about this many characters")
    p.add_argument("--held-fraction", type=float, default=0.05, help="share of bytes in held-out packages")
    p.add_argument("--held-max-share", type=float, default=0.02, help="a package bigger than this share of the bytes always trains")
    p.add_argument("--near-threshold", type=float, default=0.8, help="estimated Jaccard above which a file is a near duplicate")
    p.add_argument("--shard-tokens", type=int, default=1 << 25)
    p.add_argument("--max-train-tokens", type=int, help="stop adding training files at this many tokens")
    p.add_argument("--compress", action="store_true", help="write shards as .npy.xz (about 5x smaller)")
    p.add_argument("--vocab-sweep", help="comma-separated vocabulary sizes to measure first (tokens per held-out line), "
                                         "written to vocab_sweep.json")


def main(args) -> int:
    import json
    import sys

    def root(value, default):
        return None if value == "none" else default() if value == "auto" else Path(value)

    def progress(msg):
        print(f"corpus: {msg}", file=sys.stderr, flush=True)

    manifest = build_corpus(
        Path(args.out), stdlib=root(args.stdlib, stdlib_dir), site=root(args.site_packages, venv_site_packages),
        seed=args.seed, packages=[p for p in (args.packages or "").split(",") if p] or None,
        vocab_size=args.vocab_size, tokenizer_dir=Path(args.tokenizer) if args.tokenizer else None,
        tokenizer_bytes=int(args.tokenizer_mb * 2**20), fim_rate=args.fim_rate, spm_rate=args.spm_rate,
        fim_chars=args.fim_chars, held_fraction=args.held_fraction, held_max_share=args.held_max_share, near_threshold=args.near_threshold,
        shard_tokens=args.shard_tokens, max_train_tokens=args.max_train_tokens, slot_tokens=args.adaptive_slots,
        command="sdsat-lsp " + " ".join(getattr(args, "argv", None) or sys.argv[1:]), progress=progress, compress=args.compress,
        vocab_sweep=[int(v) for v in args.vocab_sweep.split(",")] if args.vocab_sweep else None)
    summary = {k: manifest[k] for k in ("files", "train_files", "held_files", "file_list_hash", "held_out_packages",
                                        "exclusions", "train_tokens", "held_tokens")}
    print(json.dumps(summary, indent=2))
    return 0
