"""How often a completion after a shifted KV reuse (kvshift.py) differs from a fresh prefill's, and
what the shift saves: `python -m sdsat_lsp.tools.shiftcheck [--edits 50] [--min-tokens 16 64]`.

Each sample is a held-out file (the eval tool's files), a cursor inside a line with a long window
before it, and edits above the cursor inside that window, as a user makes them elsewhere in the
file: rename a word, change a literal, insert a line, delete a line. The completion core
(`completion.complete`, the server's own pipeline and default settings, no time budget so that
output depends on nothing but the inputs) answers at the cursor, then after each edit three ways:

- `shift`: from the document's cache with shifting on (`cacheShift` = N);
- `prefix`: from the document's cache with shifting off (longest common prefix reuse, the default);
- `fresh`: no cache at all.

`prefix` must equal `fresh` (the cache without shifting is exact); `shift` may not. Reported per N:
the share of completions identical to `fresh`, per edit kind, and the prompt tokens each way feeds.
With `--chain C` each sample makes C edits in a row, asking after each (the shifted cache of one
request is the next one's): the last completion is compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import time
from pathlib import Path

EDIT_KINDS = ("rename", "literal", "insert", "delete")
_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]{2,}")
_LITERAL = re.compile(r"\d+|'[^'\n]*'|\"[^\"\n]*\"")


def pick_cursor(text: str, rng: random.Random, min_before: int = 1500) -> int | None:
    """A cursor inside a non-blank line (after its first word) with at least `min_before` characters
    before it, or None."""
    lines = [m.start() for m in re.finditer(r"^[ \t]*\S.{8,}$", text, re.M) if m.start() >= min_before]
    if not lines:
        return None
    start = rng.choice(lines)
    end = text.find("\n", start)
    end = len(text) if end < 0 else end
    first = start + len(text[start:end]) - len(text[start:end].lstrip()) + 1
    return rng.randrange(first, end) if first < end else None


def edit_above(text: str, lo: int, cursor: int, kind: str, rng: random.Random) -> tuple[str, int] | None:
    """(edited text, cursor after the edit): one edit of `kind` in a whole line between `lo` and the
    cursor's line, or None when none fits."""
    line_end = text.rfind("\n", 0, cursor)
    starts = [m.start() for m in re.finditer(r"^", text[:line_end], re.M) if m.start() >= lo]
    starts = [s for s in starts if text[s:text.find("\n", s)].strip()]
    rng.shuffle(starts)
    for s in starts:
        e = text.find("\n", s)
        line = text[s:e]
        new = _edit_line(line, kind, rng, text)
        if new is not None:
            return text[:s] + new + text[e:], cursor + len(new) - len(line)
    return None


def _edit_line(line: str, kind: str, rng: random.Random, text: str) -> str | None:
    if kind == "delete":
        return "\x00"  # a marker, removed with the line's newline by `apply_edit`
    if kind == "insert":
        indent = line[: len(line) - len(line.lstrip())]
        return f"{indent}# checked {rng.randrange(100, 999)} times\n{line}"
    pattern = _WORD if kind == "rename" else _LITERAL
    found = list(pattern.finditer(line))
    if not found:
        return None
    m = rng.choice(found)
    replacement = m.group() + "_v2" if kind == "rename" else (str(rng.randrange(2, 99)) if m.group()[0].isdigit()
                                                              else m.group()[0] + "other" + m.group()[0])
    return line[: m.start()] + replacement + line[m.end():]


def apply_edit(text: str, cursor: int, lo: int, kind: str, rng: random.Random) -> tuple[str, int] | None:
    """(edited text, cursor after the edit) for one seeded edit of `kind` above the cursor's line
    and at or after `lo` (the window start), or None when no line there takes one."""
    edited = edit_above(text, lo, cursor, kind, rng)
    if edited is None:
        return None
    new_text, new_cursor = edited
    if "\x00" in new_text:  # a deleted line: drop it with its newline
        at = new_text.index("\x00")
        new_text, new_cursor = new_text[:at] + new_text[at + 2:], new_cursor - 2
    return new_text, new_cursor


@dataclasses.dataclass
class Outcome:
    kind: str
    same: bool  # shift == fresh
    prefix_same: bool  # prefix == fresh (must hold)
    prompt: int
    fed: dict  # tokens fed per way
    shifted: int
    ms: dict  # prefill ms per way
    texts: dict  # the completion per way


def run_sample(loaded, make_cache, s, text: str, cursor: int, kinds: list[str], min_tokens: int,
               rng: random.Random) -> Outcome | None:
    from ..completion import complete
    from ..kvcache import KVCacheStore

    stores = {way: KVCacheStore(make_cache) for way in ("shift", "prefix")}
    settings = {"shift": dataclasses.replace(s, cache_shift=min_tokens), "prefix": dataclasses.replace(s, cache_shift=0)}
    keep = None  # the window head the server would pass: the previous request's
    results = {way: complete(loaded, settings[way], text, cursor, keep=keep, kv=store, uri="doc")
               for way, store in stores.items()}
    for kind in kinds:
        keep, lo = results["prefix"].prompt.window_head, results["prefix"].prompt.prefix_start
        edited = apply_edit(text, cursor, lo, kind, rng)
        if edited is None:
            return None
        text, cursor = edited
        results = {way: complete(loaded, settings[way], text, cursor, keep=keep, kv=store, uri="doc")
                   for way, store in stores.items()}
    results["fresh"] = complete(loaded, s, text, cursor, keep=keep)
    texts = {way: r.completion.text if r.completion is not None else None for way, r in results.items()}
    return Outcome("+".join(kinds), texts["shift"] == texts["fresh"], texts["prefix"] == texts["fresh"],
                   results["fresh"].stats["promptTokens"], {w: r.stats["prefillTokens"] for w, r in results.items()},
                   results["shift"].stats["shiftedTokens"], {w: r.stats["prefillMs"] for w, r in results.items()}, texts)


def _summary(outcomes: list[Outcome]) -> dict:
    n = len(outcomes)

    def mean(values) -> float:
        values = list(values)
        return round(sum(values) / len(values), 1) if values else 0.0

    by_kind = {}
    for kind in sorted({o.kind for o in outcomes}):
        group = [o for o in outcomes if o.kind == kind]
        by_kind[kind] = {"samples": len(group), "same": round(sum(o.same for o in group) / len(group), 3)}
    return {
        "samples": n, "same_as_fresh": round(sum(o.same for o in outcomes) / n, 3) if n else None,
        "prefix_same_as_fresh": round(sum(o.prefix_same for o in outcomes) / n, 3) if n else None,
        "by_kind": by_kind, "prompt_tokens": mean(o.prompt for o in outcomes),
        "fed_tokens": {w: mean(o.fed[w] for o in outcomes) for w in ("shift", "prefix", "fresh")},
        "shifted_tokens": mean(o.shifted for o in outcomes),
        "prefill_ms": {w: mean(o.ms[w] for o in outcomes) for w in ("shift", "prefix", "fresh")},
        "differences": [{"kind": o.kind, "shift": o.texts["shift"], "fresh": o.texts["fresh"]}
                        for o in outcomes if not o.same][:10],
    }


def samples(n: int, seed: int, chain: int):
    """(text, cursor, edit kinds) for `n` samples from held-out files, seeded."""
    from ..corpus import read_text, split_files

    rng = random.Random(seed)
    files = split_files()[2]
    made = 0
    while made < n:
        text = read_text(rng.choice(files))
        cursor = pick_cursor(text, rng) if text else None
        if cursor is None:
            continue
        made += 1
        yield text, cursor, [EDIT_KINDS[(made + i) % len(EDIT_KINDS)] for i in range(chain)], random.Random(rng.random())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdsat_lsp.tools.shiftcheck", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: the embedded model)")
    p.add_argument("--edits", type=int, default=50, help="samples (default 50)")
    p.add_argument("--chain", type=int, default=1, help="edits per sample, asked after each (default 1)")
    p.add_argument("--min-tokens", type=int, nargs="+", default=[16], help="cacheShift values to try (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)
    import torch

    from ..embedded import resolve_model
    from ..growable_cache import GrowableCache
    from ..settings import Settings

    torch.set_num_threads(args.threads)
    loaded = resolve_model(args.model, quantize="none")
    make_cache = lambda: GrowableCache(config=loaded.model.config)  # noqa: E731 (as loading.py builds the server's)
    base = Settings(time_budget_ms=0, deadline_ms=0, draft_store="off", compile=False)
    report = {"model": str(loaded.ref), "edits": args.edits, "chain": args.chain, "seed": args.seed, "runs": {}}
    for n in args.min_tokens:
        started, outcomes = time.perf_counter(), []
        for i, (text, cursor, kinds, rng) in enumerate(samples(args.edits, args.seed, args.chain)):
            outcome = run_sample(loaded, make_cache, base, text, cursor, kinds, n, rng)
            if outcome is not None:
                outcomes.append(outcome)
            print(f"\r  cacheShift {n}: sample {i + 1}/{args.edits}", end="", file=sys.stderr, flush=True)
        summary = _summary(outcomes)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        report["runs"][str(n)] = summary
        print(f"\ncacheShift {n}: {json.dumps(summary)}", file=sys.stderr)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
