"""`sdsat-lsp draft-store`: build (or check) a model's draft store ahead of time, so that a server's
first start does not spend half a minute on it (scripts/setup does this for the embedded model),
or distill the model's own greedy continuations, the first tier of its store (draftstore.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..draftstore import OWN_DRAFTS_FILE, open_store, store_choice
from ..errors import SdsatError


def add_arguments(p) -> None:
    p.add_argument("--model", help="model folder or hub id (default: the embedded model)")
    p.add_argument("--source", default="auto", help="stdlib | a folder of Python files | auto (default: the model "
                   "card's choice; nothing to do when it names none)")
    p.add_argument("--distill", type=int, default=0, metavar="N",
                   help=f"instead: write the model's own greedy continuations of N prompts cut from the standard "
                   f"library's training files, the first tier of its store (default file: {OWN_DRAFTS_FILE} in the "
                   "model folder, with a .json of how it was made); resumes an interrupted run")
    p.add_argument("--out", help="with --distill: where to write the continuations")
    p.add_argument("--seed", type=int, default=77, help="with --distill: seed for cutting prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="with --distill: tokens per continuation")


def main(args) -> int:
    import sys
    import time

    from ..embedded import resolve_model

    loaded = resolve_model(args.model, quantize="none", device="auto", dtype="auto")
    choice = store_choice(args.source, loaded.card)
    if args.distill:
        return distill(loaded, args, choice)
    if not choice:
        print(f"{loaded.ref}: its model card names no draft store; nothing to build", file=sys.stderr)
        return 0
    started = time.perf_counter()
    store = open_store(choice, loaded.tokenizer, loaded.model.get_input_embeddings().weight.shape[0],
                       progress=lambda message: print(message, file=sys.stderr, flush=True), model_dir=loaded.folder)
    print(f"draft store {store.source} for {loaded.ref}: {len(store)} tokens, ready in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def distill(loaded, args, choice: str | None) -> int:
    """Greedy continuations of prompts cut at line starts from the training files, each stored
    after the prompt's last 8 tokens (what a query matches on) and followed by EOS. The decoding
    uses the fastest mode at hand (output equal to plain greedy: the engine's tests hold it to
    that). Saved every 100 prompts, so an interrupted run resumes where it stopped."""
    import hashlib
    import json
    import sys
    import time

    from ..corpus import cut_prompts, file_list_hash, split_files
    from ..decoding import TREE_NODES
    from ..engine import generate

    if args.distill < 1 or args.max_new_tokens < 1:
        raise SdsatError("--distill and --max-new-tokens must be at least 1")
    out = Path(args.out) if args.out else Path(loaded.folder) / OWN_DRAFTS_FILE
    partial = out.with_name(out.name + ".partial.json")
    root, train, _held_out = split_files()
    recipe = {"command": "sdsat-lsp draft-store " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["draft-store"] else "",
              "prompts": args.distill, "seed": args.seed, "max_new_tokens": args.max_new_tokens, "prompt_chars": 1000,
              "files_hash": file_list_hash(train, root), "model": _model_name(loaded),
              "model_sha256": _weights_digest(Path(loaded.folder))}
    segments: list[list[int]] = []
    if partial.is_file():
        saved = json.loads(partial.read_text())
        if {k: saved["recipe"].get(k) for k in recipe if k != "command"} == {k: v for k, v in recipe.items() if k != "command"}:
            segments = saved["segments"]
            print(f"resuming: {len(segments)} of {args.distill} prompts done", file=sys.stderr)
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    helper = open_store(choice, loaded.tokenizer, vocab, model_dir=None) if choice else None
    card = loaded.card
    eos = loaded.tokenizer.eos_token_id
    prompts = cut_prompts(args.distill, seed=args.seed, max_chars=recipe["prompt_chars"], files=train)
    started = time.perf_counter()
    first = len(segments)
    for i in range(first, len(prompts)):
        ids = loaded.tokenizer(prompts[i].text)["input_ids"]
        sdsat = bool(card.adaptive_ids)
        gen = generate(loaded.model, ids, mode="fused" if sdsat else "ar", k=card.k, adaptive_ids=card.adaptive_ids,
                       max_new_tokens=args.max_new_tokens, lookup_ngram=3 if sdsat else 0, draft_store=helper,
                       tree_nodes=TREE_NODES)
        segments.append(ids[-8:] + gen.tokens + ([eos] if eos is not None else []))
        done = i + 1
        if done % 100 == 0 or done == len(prompts):
            partial.write_text(json.dumps({"recipe": recipe, "segments": segments}))
            rate = (done - first) / (time.perf_counter() - started)
            print(f"  {done}/{len(prompts)} prompts, {(len(prompts) - done) / rate / 60:.1f} min left", file=sys.stderr,
                  flush=True)
    tokens = np.array([t for seg in segments for t in seg], dtype=np.int32)
    with open(out, "wb") as handle:  # np.save(path) would add ".npy" to any other name
        np.save(handle, tokens)
    recipe.update(tokens=int(len(tokens)), sha256=hashlib.sha256(out.read_bytes()).hexdigest())
    out.with_suffix(".json").write_text(json.dumps(recipe, indent=2) + "\n")
    partial.unlink()
    print(f"wrote {out}: {len(tokens)} tokens from {len(segments)} prompts", file=sys.stderr)
    return 0


def _model_name(loaded) -> str:
    from ..embedded import EMBEDDED_DIR

    return "embedded (sdsat_lsp/models/default)" if Path(loaded.folder) == EMBEDDED_DIR else loaded.ref


def _weights_digest(folder: Path) -> str:
    weights = sorted(folder.glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.read_bytes())
    return digest.hexdigest() if weights else ""
