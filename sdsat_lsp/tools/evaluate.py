"""`sdsat-lsp eval`: completion quality the way an editor asks for it.

Real held-out files are cut at random points inside lines; the model completes to the end of the
line (`line` task). Separately, after a line ending in `:` the model writes the indented block
that follows (`block` task). For a model that infills (FIM ids in its card), `fim_line` removes a
span from the middle of a line and `fim_block` an indented block, the text after them given as
the suffix in the server's own prompt (prompt.build_prompt, SPM order). Scores: exact match (after trailing whitespace) and edit similarity
(1 - Levenshtein distance / longer length, averaged). Greedy SDSAT decoding is identical to plain
greedy decoding, so these figures are the model's own.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdsatError


@dataclass(frozen=True)
class Sample:
    task: str  # "line" | "block" | "fim_line" | "fim_block"
    path: str
    prompt: str
    target: str
    suffix: str = ""  # FIM tasks: the text after the hole


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len): 1.0 for equal strings, 0.0 for nothing in common."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def block_after(lines: list[str], opener: int, max_lines: int = 8) -> list[str]:
    """The indented block under `lines[opener]` (which ends in ':'), blank lines inside kept."""
    base = _indent(lines[opener])
    block: list[str] = []
    for line in lines[opener + 1 :]:
        if line.strip() and _indent(line) <= base:
            break
        block.append(line)
        if len(block) >= max_lines:
            break
    while block and not block[-1].strip():
        block.pop()
    return block


def _random_block(lines: list[str], offsets: list[int], rng: random.Random) -> tuple[int, list[str]]:
    """(a seeded `:` line at least 100 characters in, the block under it); an empty block when the
    file has no such line or the line has no block."""
    openers = [j for j, line in enumerate(lines) if line.rstrip().endswith(":") and not line.lstrip().startswith("#")
               and offsets[j] >= 100]
    if not openers:
        return -1, []
    j = rng.choice(openers)
    return j, block_after(lines, j)


def _seeded_files(source, rng: random.Random, wanted: dict[str, int], what: str):
    """(path, text, lines, line start offsets) of seeded picks among the held-out files (or every
    file under `source`), until the caller has counted `wanted` down to zero."""
    from ..corpus import python_files, read_text, split_files

    files = python_files(source) if source else split_files()[2]
    limit = 100 * sum(wanted.values()) + 100
    attempts = 0
    while any(wanted.values()):
        attempts += 1
        if attempts > limit:
            raise SdsatError(f"could not cut enough {what} from the files")
        path = rng.choice(files)
        text = read_text(path)
        if not text:
            continue
        lines = text.split("\n")
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line) + 1)
        yield path, text, lines, offsets


def cut_samples(n_line: int, n_block: int, source=None, seed: int = 0, max_chars: int = 1500) -> list[Sample]:
    """Seeded samples from held-out files (or every file under `source`)."""
    return _cut(source, random.Random(seed), {"line": n_line, "block": n_block}, "evaluation samples",
                {"line": _line_sample, "block": _block_sample}, max_chars)


def cut_fim_samples(n_line: int, n_block: int, source=None, seed: int = 0, max_chars: int = 1500) -> list[Sample]:
    """Seeded FIM samples (a seed of their own: the line and block samples stay as they were):
    `fim_line` a span of 3 or more characters from inside a line, the rest of the line and what
    follows as suffix; `fim_block` the indented block under a `:` line, what follows as suffix."""
    return _cut(source, random.Random(seed + 7919), {"fim_line": n_line, "fim_block": n_block}, "FIM samples",
                {"fim_line": _fim_line_sample, "fim_block": _fim_block_sample}, max_chars)


def _cut(source, rng: random.Random, wanted: dict[str, int], what: str, cutters: dict, max_chars: int) -> list[Sample]:
    """`wanted[task]` samples of each of the two tasks, cut by `cutters[task]` from seeded files;
    while both are wanted, a seeded coin picks which a file is tried for. A cutter returns None
    when the file offers no sample at its draw (the next file is tried)."""
    first, second = wanted
    samples: list[Sample] = []
    for path, text, lines, offsets in _seeded_files(source, rng, wanted, what):
        task = first if wanted[first] and (not wanted[second] or rng.random() < 0.5) else second
        sample = cutters[task](str(path), text, lines, offsets, rng, max_chars)
        if sample is not None:
            samples.append(sample)
            wanted[task] -= 1
    return samples


def _code_line(lines: list[str], offsets: list[int], rng: random.Random, min_chars: int):
    """(index, indent, line without trailing whitespace) of a seeded line at least 100 characters
    in, with `min_chars` or more after its indent and not a comment; None when the draw is not one."""
    i = rng.randrange(len(lines))
    line = lines[i].rstrip()
    start = _indent(line)
    if len(line) - start < min_chars or line.lstrip().startswith("#") or offsets[i] < 100:
        return None
    return i, start, line


def _line_sample(path: str, text: str, lines, offsets, rng: random.Random, max_chars: int) -> Sample | None:
    """The text up to a seeded point inside a line; the rest of the line is the target."""
    picked = _code_line(lines, offsets, rng, 8)
    if picked is None:
        return None
    i, start, line = picked
    cut = rng.randrange(start + 1, len(line))
    return Sample("line", path, text[: offsets[i] + cut][-max_chars:], lines[i][cut:].rstrip())


def _block_sample(path: str, text: str, lines, offsets, rng: random.Random, max_chars: int) -> Sample | None:
    """The text up to a seeded `:` line; the block under it is the target."""
    j, block = _random_block(lines, offsets, rng)
    if not block:
        return None
    return Sample("block", path, text[: offsets[j + 1]][-max_chars:], "\n".join(line.rstrip() for line in block))


def _fim_line_sample(path: str, text: str, lines, offsets, rng: random.Random, max_chars: int) -> Sample | None:
    """A seeded span of 3 or more characters inside a line is the hole."""
    picked = _code_line(lines, offsets, rng, 12)
    if picked is None:
        return None
    i, start, line = picked
    a = rng.randrange(start + 1, len(line) - 4)
    b = rng.randrange(a + 3, len(line))
    return _fim_sample("fim_line", path, text, offsets[i] + a, offsets[i] + b, max_chars)


def _fim_block_sample(path: str, text: str, lines, offsets, rng: random.Random, max_chars: int) -> Sample | None:
    """The block under a seeded `:` line is the hole (a block that ends the file is not one: no suffix)."""
    j, block = _random_block(lines, offsets, rng)
    if not block or j + 1 + len(block) >= len(lines):
        return None
    return _fim_sample("fim_block", path, text, offsets[j + 1], offsets[j + 1 + len(block)], max_chars)


def _fim_sample(task: str, path: str, text: str, hole_start: int, hole_end: int, max_chars: int) -> Sample:
    target = text[hole_start:hole_end]
    if task == "fim_block":
        target = "\n".join(line.rstrip() for line in target.rstrip("\n").split("\n"))
    return Sample(task, path, text[max(0, hole_start - max_chars):hole_start], target,
                  text[hole_end : hole_end + max_chars])


def _complete_fim(loaded, sample: Sample, k: int, adaptive_ids: list[int], max_new_tokens: int) -> str:
    from ..engine import generate
    from ..prompt import build_prompt, continuation_decoder

    tokenizer = loaded.tokenizer
    text = sample.prompt + sample.suffix
    prompt = build_prompt(text, len(sample.prompt), tokenizer, max_tokens=1024, max_suffix_tokens=128,
                          fim_ids=loaded.card.fim, line_mode="single" if sample.task == "fim_line" else "multi")
    decode = continuation_decoder(tokenizer, prompt.ids)
    options = dict(mode="fused" if adaptive_ids else "ar", k=k, adaptive_ids=adaptive_ids, decode=decode)
    if sample.task == "fim_line":
        out = generate(loaded.model, prompt.ids, max_new_tokens=max_new_tokens, stop_strings=["\n"], **options)
        got = decode(out.tokens).split("\n", 1)[0]
        rest = sample.suffix.split("\n", 1)[0]
        # As the server does: a completion that runs on into the text after the hole stops there.
        return got[: -len(rest)] if rest and got.endswith(rest) else got
    out = generate(loaded.model, prompt.ids, max_new_tokens=4 * max_new_tokens, **options)
    got = decode(out.tokens)
    lines = got.rstrip("\n").split("\n")
    opener_indent = _indent(sample.prompt.rstrip("\n").rsplit("\n", 1)[-1])
    block = block_after([" " * opener_indent + "x:"] + lines, 0, max_lines=len(lines))
    return "\n".join(line.rstrip() for line in block)


def complete(loaded, sample: Sample, k: int, adaptive_ids: list[int], max_new_tokens: int,
             token_healing: bool = True) -> str:
    """The model's completion for `sample`, cut where an editor would cut it: the completion core's
    healing and decoding steps (completion.py), on the sample's text as the prompt."""
    from ..completion import decode, heal_prompt

    if sample.task.startswith("fim_"):
        return _complete_fim(loaded, sample, k, adaptive_ids, max_new_tokens)
    tokenizer = loaded.tokenizer
    mode = "fused" if adaptive_ids else "ar"  # a plain model is evaluated too (the "before" figure)
    prompt = heal_prompt(tokenizer, tokenizer(sample.prompt)["input_ids"], token_healing)
    options = dict(mode=mode, k=k, adaptive_ids=adaptive_ids)

    if sample.task == "line":
        out = decode(loaded.model, prompt, max_new_tokens=max_new_tokens, stop_strings=["\n"], **options)
        return prompt.decode(out.tokens).split("\n", 1)[0].rstrip()
    opener_indent = _indent(sample.prompt.rstrip("\n").rsplit("\n", 1)[-1])

    def dedented(ids) -> bool:
        lines = prompt.decode(ids).split("\n")
        return any(line.strip() and _indent(line) <= opener_indent for line in lines[:-1])

    out = decode(loaded.model, prompt, max_new_tokens=4 * max_new_tokens, should_stop=dedented, **options)
    lines = prompt.decode(out.tokens).split("\n")
    if out.finish_reason != "stop":
        lines = lines[:-1] if len(lines) > 1 else lines
    block = block_after([" " * opener_indent + "x:"] + lines, 0)
    return "\n".join(line.rstrip() for line in block)


def run_eval(loaded, samples: list[Sample], k: int, adaptive_ids: list[int], max_new_tokens: int = 48,
             progress=None, token_healing: bool = True) -> dict:
    by_task: dict[str, list[tuple[bool, float]]] = {"line": [], "block": []}
    by_task.update((s.task, []) for s in samples if s.task.startswith("fim_"))
    examples = []
    started = time.perf_counter()
    for i, sample in enumerate(samples):
        got = complete(loaded, sample, k, adaptive_ids, max_new_tokens, token_healing)
        by_task[sample.task].append((got == sample.target, edit_similarity(got, sample.target)))
        if len(examples) < 5:
            examples.append({"task": sample.task, "target": sample.target, "completion": got})
        if progress:
            progress(i + 1, len(samples))
    result: dict = {}
    for task, scores in by_task.items():
        result[task] = {
            "exact_match": round(sum(s[0] for s in scores) / len(scores), 4) if scores else None,
            "edit_similarity": round(sum(s[1] for s in scores) / len(scores), 4) if scores else None,
            "samples": len(scores),
        }
    result.update(exact_match=result["line"]["exact_match"], edit_similarity=result["line"]["edit_similarity"],
                  samples=sum(1 for s in samples if not s.task.startswith("fim_")),  # line + block, as before FIM
                  fim_samples=sum(1 for s in samples if s.task.startswith("fim_")), wall_s=round(time.perf_counter() - started, 2), examples=examples)
    return result


def add_arguments(p) -> None:
    p.add_argument("--model", help="model folder or hub id (default: the embedded model)")
    p.add_argument("--quantize", default="auto", help="auto | none | nf4 | int8 | dynamic-int8")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--samples", type=int, default=100, help="line-completion samples (default 100)")
    p.add_argument("--block-samples", type=int, default=30, help="block-completion samples (default 30)")
    p.add_argument("--fim-samples", type=int, default=30,
                   help="fill-in-the-middle samples, half in a line, half a block (default 30; only for a model whose "
                        "card has FIM ids)")
    p.add_argument("--source", help="cut samples from the Python files under this folder (default: held-out stdlib files)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-chars", type=int, default=1500)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-token-healing", dest="token_healing", action="store_false",
                   help="decode prompts as cut, even when they end inside a token (see healing.py)")
    p.add_argument("--json", dest="json_path", help="write the results here")


def main(args) -> int:
    from ..embedded import resolve_model

    if args.samples < 0 or args.block_samples < 0 or args.samples + args.block_samples == 0:
        raise SdsatError("--samples and --block-samples must be non-negative, and not both zero")
    loaded = resolve_model(args.model, quantize=args.quantize, device=args.device, dtype=args.dtype)
    k, adaptive_ids = loaded.card.k, list(loaded.card.adaptive_ids)
    samples = cut_samples(args.samples, args.block_samples, source=args.source, seed=args.seed, max_chars=args.prompt_chars)
    fim_ids = loaded.card.fim or {}
    if args.fim_samples > 0 and all(role in fim_ids for role in ("prefix", "suffix", "middle")):
        samples += cut_fim_samples(args.fim_samples - args.fim_samples // 2, args.fim_samples // 2, source=args.source,
                                   seed=args.seed, max_chars=args.prompt_chars)

    def progress(done, total):
        print(f"\r  sample {done}/{total}", end="", file=sys.stderr, flush=True)

    result = run_eval(loaded, samples, k, adaptive_ids, args.max_new_tokens, progress, args.token_healing)
    print(file=sys.stderr)
    result.update(model=str(loaded.ref), quantize=loaded.quantize, device=loaded.device, source=args.source or "stdlib-held-out",
                  seed=args.seed, token_healing=args.token_healing)
    for task in ("line", "block", "fim_line", "fim_block"):
        r = result.get(task)
        if r and r["samples"]:
            print(f"{task:<6} exact_match {r['exact_match']:.3f}  edit_similarity {r['edit_similarity']:.3f}  ({r['samples']} samples)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0
