"""`sdsat-lsp bench`: autoregressive vs SDSAT (two-pass and fused) on the same prompts, in one
process, alternating per prompt so that machine noise hits every mode alike; Hugging Face's own
`generate()` (plain greedy and prompt-lookup decoding) runs beside them as the figure a user would
get otherwise. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from ..decoding import LOOKUP_NGRAM, TREE_DEPTH, TREE_NODES
from ..errors import SdsatError

log = logging.getLogger(__name__)

SDSAT_MODES = ("two-pass", "fused", "fused+lookup", "fused+store")
# Bench mode -> (engine mode, n-gram size for context-lookup drafts, whether the draft store drafts,
# whether its drafts are verified as trees). "fused+lookup" drafts from the context when the last
# tokens occurred there before and from the adaptive tokens otherwise; "fused+store" tries the draft
# store (retrieval) between the two. "fused+store-chain" verifies one retrieved continuation per
# pass: shown beside the trees for comparison, never the headline.
ENGINE_MODES = {"ar": ("ar", 0, False, False), "two-pass": ("two-pass", 0, False, False),
                "fused": ("fused", 0, False, False), "fused+lookup": ("fused", LOOKUP_NGRAM, False, False),
                "fused+store": ("fused", LOOKUP_NGRAM, True, True),
                "fused+store-chain": ("fused", LOOKUP_NGRAM, True, False)}


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder or hub id (default: the embedded model)")
    p.add_argument("--adaptive-ids", type=_int_list, help="adaptive token id(s), comma-separated (default: the model card's)")
    p.add_argument("--k", type=int, help="adaptive tokens per draft (default: the model card's)")
    p.add_argument("--prompts", type=int, default=20, help="number of prompts (default 20)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--source", help="cut prompts from the Python files under this folder (default: the standard library's "
                   "held-out files, which no model we train has seen)")
    p.add_argument("--prompt-chars", type=int, default=1500, help="at most this many characters of context per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed for cutting prompts")
    p.add_argument("--quantize", default="auto", help="auto | none | nf4 | int8 | dynamic-int8")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--draft-length", default="adaptive", choices=("adaptive", "fixed"),
                   help="adaptive: between 1 and k drafts, following acceptance (default); fixed: always k")
    p.add_argument("--draft-store", default="auto", metavar="auto|stdlib|none|DIR",
                   help="the code that the fused+store mode retrieves drafts from: the standard library's training "
                   "files (never the held-out ones the default prompts come from), none (skip the mode), or the "
                   "Python files under DIR; built once and cached. auto (default): the model card's choice (the "
                   "embedded model's: stdlib), else none")
    p.add_argument("--tree-nodes", type=int, default=TREE_NODES,
                   help=f"fused+store verifies a tree of up to this many retrieved tokens per pass; 0: one continuation "
                   f"(default {TREE_NODES})")
    p.add_argument("--tree-depth", type=int, default=TREE_DEPTH,
                   help=f"how deep those trees go (default {TREE_DEPTH})")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate() comparison")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=os.environ.get("SDSAT_LSP_COMPILE", "1") != "0",
                   help="decode through the compiled forward (compiled.py; compiled before the runs, cached on disk); "
                   "--no-compile: transformers' eager forward (default: compile, unless SDSAT_LSP_COMPILE=0)")
    p.add_argument("--compare-eager", action="store_true",
                   help="with --compile: also run ar and the best SDSAT modes eagerly, interleaved (modes NAME-eager)")
    p.add_argument("--peer", choices=("llama.cpp",),
                   help="also decode every prompt with this engine on the same model (converted to GGUF; "
                   "llama-cpp-python built once under ~/.cache/sdsat-lsp/peers), interleaved; JSON: peers")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and the peer (default: torch's choice)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the figures (needs matplotlib: pip install 'sdsat-lsp[plot]')")
    p.add_argument("--json", dest="json_path", help="write the results here")
    p.add_argument("--editor-session", metavar="FILE",
                   help="instead: replay typing FILE against the server over stdio, with and without the KV cache")


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def _per_pass(accepted: int, passes: int) -> float | None:
    """Accepted drafts per pass of one kind; None (JSON null) when there was no such pass."""
    return round(accepted / passes, 4) if passes else None


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


EAGER = "-eager"  # a mode name's suffix: the same mode through transformers' eager forward


def _pass_costs(costs) -> dict:
    """Median ms per pass, and passes, by tokens fed (JSON keys are strings)."""
    by_fed: dict[int, list[float]] = {}
    for fed, ms in costs:
        by_fed.setdefault(fed, []).append(ms)
    return {"ms_per_pass_by_tokens_fed": {str(f): round(_median(v), 3) for f, v in sorted(by_fed.items())},
            "passes_by_tokens_fed": {str(f): len(v) for f, v in sorted(by_fed.items())}}


def _timings(gens) -> dict:
    """Per-prompt wall ms, the prefill and decoding ms per new token (medians over prompts)."""
    return {
        "per_prompt_ms": [round(g.stats.wall_ms, 2) for g in gens],
        "prefill_ms": round(_median([g.stats.prefill_ms for g in gens]), 2),
        "decode_ms_per_token": round(_median([(g.stats.wall_ms - g.stats.prefill_ms) / max(1, len(g.tokens) - 1)
                                              for g in gens]), 3),
    }


def _peer_entries(peer, runs: dict[str, list], ar) -> dict:
    """The peer's modes with the keys of ours (those that have no meaning for it are null or 0)."""
    return {mode: {**_mode_entry(gens, ar), "threads": peer.threads} for mode, gens in runs.items()}


def run_bench(loaded, prompts: list[list[int]], *, k: int, adaptive_ids: list[int], max_new_tokens: int,
              with_hf: bool = True, progress=None, draft_length: str = "adaptive", draft_store=None,
              tree_nodes: int = TREE_NODES, tree_depth: int = TREE_DEPTH, peer=None, compare_eager: bool = False) -> dict:
    """Decode every prompt with every mode; return the figures (see `main` for the keys). `peer`: another
    engine (peer.py) decoding the same prompts in its modes, interleaved with ours. `compare_eager`:
    with a compiled forward attached, ar and the SDSAT modes also run eagerly (NAME-eager)."""
    from ..compiled import attach, attached
    from ..engine import generate

    model = loaded.model
    compiled = attached(model)
    sdsat_modes = tuple(m for m in SDSAT_MODES if draft_store is not None or not ENGINE_MODES[m][2])
    modes = ("ar",) + sdsat_modes + (("fused+store-chain",) if draft_store is not None and tree_nodes else ())
    if compare_eager and compiled is not None:
        modes += tuple(m + EAGER for m in ("ar",) + sdsat_modes[-2:])
    peer_modes = tuple(("peer", m) for m in peer.modes) if peer is not None else ()
    peer_runs: dict[str, list] = {m: [] for _, m in peer_modes}
    runs: dict[str, list] = {m: [] for m in modes}
    hf_runs: dict[str, list] = {"hf-greedy": [], "hf-prompt-lookup": []}
    eos = model.config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    # Warm-up: first passes pay for allocator growth and lazy initialisation.
    def run(mode, prompt: list[int], new_tokens: int):
        if isinstance(mode, tuple):  # the peer's
            return peer.run(mode[1], prompt, new_tokens, eos_ids)
        eager = mode.endswith(EAGER)
        engine_mode, ngram, use_store, tree = ENGINE_MODES[mode.removesuffix(EAGER)]
        if eager:
            attach(model, None)
        try:
            return generate(model, prompt, mode=engine_mode, k=k, adaptive_ids=adaptive_ids, max_new_tokens=new_tokens,
                            eos_ids=eos_ids, draft_length=draft_length, lookup_ngram=ngram,
                            draft_store=draft_store if use_store else None, tree_nodes=tree_nodes if tree else 0,
                            tree_depth=tree_depth)
        finally:
            if eager:
                attach(model, compiled)

    everything = modes + peer_modes
    for mode in everything:
        run(mode, prompts[0][:32], 8)

    for i, prompt in enumerate(prompts):
        # Rotate the order so no mode always runs first (caches, turbo, noisy neighbours).
        order = everything[i % len(everything):] + everything[: i % len(everything)]
        for mode in order:
            (peer_runs[mode[1]] if isinstance(mode, tuple) else runs[mode]).append(run(mode, prompt, max_new_tokens))
        if with_hf:
            for name, extra in (("hf-greedy", {}), ("hf-prompt-lookup", {"prompt_lookup_num_tokens": 10})):
                hf_runs[name].append(_hf_generate(model, prompt, max_new_tokens, eos_ids, extra))
        if progress:
            progress(i + 1, len(prompts))

    ar = runs["ar"]
    result: dict = {"modes": {}}
    for mode in modes:
        result["modes"][mode] = _mode_entry(runs[mode], ar)
    if peer is not None:
        result["peers"] = {peer.name: _peer_entries(peer, peer_runs, ar)}
    for name, outs in hf_runs.items():
        if outs:
            result["modes"][name] = _hf_entry(outs, ar)
    best = max(sdsat_modes, key=lambda m: result["modes"][m]["speedup"])
    result.update(
        identical=all(result["modes"][m]["identical"] for m in modes if not m.endswith(EAGER)),
        best_mode=best,
        speedup=result["modes"][best]["speedup"],
        tokens_per_pass=result["modes"][best]["tokens_per_pass"],
        mean_accepted=result["modes"][best]["mean_accepted"],
        mean_accepted_adaptive=result["modes"][best]["mean_accepted_adaptive"],
        ar_tokens_per_s=result["modes"]["ar"]["tokens_per_s"],
        sdsat_tokens_per_s=result["modes"][best]["tokens_per_s"],
    )
    return result


def _mode_entry(gens: list, ar: list) -> dict:
    """One engine mode's figures over the prompts (`ar`: the same prompts decoded by plain AR)."""
    new_tokens = sum(g.stats.new_tokens for g in gens)
    wall_s = sum(g.stats.wall_ms for g in gens) / 1e3
    passes = sum(g.stats.forward_passes for g in gens)
    verify = sum(g.stats.verify_passes for g in gens)
    return {
        "identical": all(g.tokens == a.tokens for g, a in zip(gens, ar)),
        "tokens": new_tokens,
        "wall_s": round(wall_s, 4),
        "tokens_per_s": round(new_tokens / wall_s, 2) if wall_s else 0.0,
        "forward_passes": passes,
        "tokens_per_pass": round(new_tokens / passes, 4) if passes else 0.0,
        "mean_accepted": _ratio(sum(g.stats.drafts_accepted for g in gens), verify),
        "mean_accepted_adaptive": _per_pass(
            sum(g.stats.drafts_accepted - g.stats.lookup_accepted - g.stats.store_accepted for g in gens),
            sum(g.stats.verify_passes - g.stats.lookup_passes - g.stats.store_passes for g in gens)),
        "lookup_passes": sum(g.stats.lookup_passes for g in gens),
        "store_passes": sum(g.stats.store_passes for g in gens),
        "mean_accepted_store": _per_pass(sum(g.stats.store_accepted for g in gens), sum(g.stats.store_passes for g in gens)),
        "tokens_fed_per_pass": _ratio(sum(g.stats.tokens_fed - g.stats.prefill_tokens for g in gens), passes),
        "speedup": round(_median([a.stats.wall_ms / g.stats.wall_ms for g, a in zip(gens, ar)]), 4),
        "median_ms": round(_median([g.stats.wall_ms for g in gens]), 2),
        **_timings(gens),
        **_pass_costs([c for g in gens for c in g.stats.pass_costs]),
    }


def _hf_entry(outs: list, ar: list) -> dict:
    """transformers' generate() figures: `outs` are (tokens, wall ms) per prompt."""
    tokens = sum(len(o[0]) for o in outs)
    wall_s = sum(o[1] for o in outs) / 1e3
    return {
        "identical": all(o[0] == a.tokens for o, a in zip(outs, ar)),
        "tokens": tokens,
        "wall_s": round(wall_s, 4),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s else 0.0,
        "speedup": round(_median([a.stats.wall_ms / o[1] for o, a in zip(outs, ar)]), 4),
        "median_ms": round(_median([o[1] for o in outs]), 2),
    }


def _hf_generate(model, prompt: list[int], max_new_tokens: int, eos_ids: list[int], extra: dict):
    """(tokens without the prompt and without a final EOS, wall ms) from transformers' generate()."""
    import torch

    device = model.get_input_embeddings().weight.device
    input_ids = torch.tensor([prompt], device=device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_ids or None, pad_token_id=(eos_ids or [0])[0], **extra)
    wall_ms = (time.perf_counter() - started) * 1e3
    tokens = out[0, len(prompt):].tolist()
    if tokens and tokens[-1] in eos_ids:
        tokens = tokens[:-1]
    return tokens, wall_ms


def _number(value: float | None) -> float:
    return float("nan") if value is None else value


def format_table(result: dict) -> str:
    nan = float("nan")
    header = (f"{'mode':<18}{'identical':>10}{'tok/s':>10}{'tok/pass':>10}{'fed/pass':>10}{'accepted':>10}"
              f"{'(adaptive)':>11}{'median ms':>11}{'speedup':>9}")
    lines = [header, "-" * len(header)]
    for mode, e in result["modes"].items():
        lines.append(
            f"{mode:<18}{str(e['identical']):>10}{e['tokens_per_s']:>10.1f}{e.get('tokens_per_pass', nan):>10.2f}"
            f"{e.get('tokens_fed_per_pass', nan):>10.2f}{e.get('mean_accepted', nan):>10.2f}"
            f"{_number(e.get('mean_accepted_adaptive')):>11.2f}{e['median_ms']:>11.1f}{e['speedup']:>8.2f}x"
        )
    return "\n".join(lines)


def _editor_session(args) -> int:
    from .session_bench import run_editor_session

    if not Path(args.editor_session).is_file():
        raise SdsatError(f"--editor-session file {args.editor_session} does not exist")
    settings = {"quantize": args.quantize, "device": args.device}
    if args.k is not None:
        settings["k"] = args.k
    if not args.compile:
        settings["compile"] = False
    result = run_editor_session(args.editor_session, model=args.model, settings=settings, json_out=args.json_path)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("latencies_ms")}, indent=2))
    if args.plot:
        from .plots import plot_session

        plot_session(result, args.plot)
    return 0


def _draft_store(choice: str, loaded):
    from ..draftstore import open_store, store_choice

    choice = store_choice(choice, loaded.card)
    if choice is None:
        return None
    return open_store(choice, loaded.tokenizer, loaded.model.get_input_embeddings().weight.shape[0],
                      progress=lambda message: print(message, file=sys.stderr, flush=True), model_dir=loaded.folder)


def _compile(model):
    """The compiled forward, compiled (or loaded from the disk cache) before the runs and attached;
    None, said on stderr, when the model is not one it covers."""
    from ..compiled import CompiledForward, attach, supported

    why = supported(model)
    if why is not None:
        print(f"compiled forward: not for this model ({why}); eager", file=sys.stderr)
        return None
    compiled = CompiledForward.for_device(model)
    print("compiling the forward pass (cached on disk after the first time) ...", file=sys.stderr, flush=True)
    compiled.warm_up()
    print(f"  compiled in {compiled.compile_s:.1f} s", file=sys.stderr)
    attach(model, compiled)
    return compiled


def _open_peer(name: str, loaded, n_ctx: int):
    import torch

    from .peer import open_peer

    return open_peer(name, loaded.folder, n_ctx, torch.get_num_threads(),
                     progress=lambda message: print(message, file=sys.stderr, flush=True))


def main(args) -> int:
    from ..corpus import cut_prompts, split_files
    from ..embedded import resolve_model

    if args.editor_session:
        return _editor_session(args)

    if args.k is not None and args.k < 1:
        raise SdsatError(f"--k must be at least 1 (got {args.k})")
    if args.prompts < 1 or args.max_new_tokens < 1:
        raise SdsatError("--prompts and --max-new-tokens must be at least 1")
    if not 0 <= args.tree_nodes <= 64:
        raise SdsatError(f"--tree-nodes must lie in 0..64 (got {args.tree_nodes})")
    if not 1 <= args.tree_depth <= 64:
        raise SdsatError(f"--tree-depth must lie in 1..64 (got {args.tree_depth})")
    if args.threads < 0:
        raise SdsatError(f"--threads must be at least 0 (got {args.threads})")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = resolve_model(args.model, quantize=args.quantize, device=args.device, dtype=args.dtype,
                           adaptive_ids=args.adaptive_ids, k=args.k)
    k = args.k or loaded.card.k
    adaptive_ids = args.adaptive_ids or loaded.card.adaptive_ids
    from ..engine import check_settings, context_length

    check_settings(loaded.model, k, adaptive_ids, "fused")
    # Drafts are easy on text a model memorized; the default measures code no model we train has seen.
    files = None if args.source else split_files()[2]
    texts = cut_prompts(args.prompts, source=args.source, seed=args.seed, max_chars=args.prompt_chars, files=files)
    prompts = [loaded.tokenizer(p.text)["input_ids"] for p in texts]
    ctx = context_length(loaded.model)
    too_long = [len(p) for p in prompts if len(p) + args.max_new_tokens > ctx]
    if too_long:
        raise SdsatError(f"a prompt of {max(too_long)} tokens plus --max-new-tokens {args.max_new_tokens} exceeds the "
                         f"model's context of {ctx}; lower --prompt-chars or --max-new-tokens")

    def progress(done: int, total: int) -> None:
        print(f"\r  prompt {done}/{total}", end="", file=sys.stderr, flush=True)

    print(f"model {loaded.ref} ({loaded.quantize}, {loaded.dtype}, {loaded.device}); k={k}; "
          f"{len(prompts)} prompts, {args.max_new_tokens} new tokens each", file=sys.stderr)
    store = _draft_store(args.draft_store, loaded)
    compiled = _compile(loaded.model) if args.compile else None
    peer = _open_peer(args.peer, loaded, max(len(p) for p in prompts) + args.max_new_tokens + 16) if args.peer else None
    try:
        result = run_bench(loaded, prompts, k=k, adaptive_ids=list(adaptive_ids), max_new_tokens=args.max_new_tokens,
                           with_hf=not args.no_hf, progress=progress, draft_length=args.draft_length, draft_store=store,
                           tree_nodes=args.tree_nodes, tree_depth=args.tree_depth, peer=peer,
                           compare_eager=args.compare_eager)
    finally:
        if peer is not None:
            peer.close()
    print(file=sys.stderr)
    import torch

    result.update(compile=compiled is not None and compiled.compiled, compile_s=compiled.compile_s if compiled else None,
                  threads=torch.get_num_threads())
    result.update(k=k, adaptive_ids=list(adaptive_ids), model=str(loaded.ref), device=loaded.device,
                  quantize=loaded.quantize, dtype=loaded.dtype, prompts=len(prompts), max_new_tokens=args.max_new_tokens,
                  source=args.source or "stdlib-held-out", draft_length=args.draft_length,
                  draft_store=store.source if store is not None else "none", draft_store_tokens=len(store) if store is not None else 0,
                  tree_nodes=args.tree_nodes, tree_depth=args.tree_depth)
    print(format_table(result))
    for name, entries in result.get("peers", {}).items():
        print(format_table({"modes": {f"{name} {m}": e for m, e in entries.items()}}).split("\n", 2)[2])
    if args.plot:
        from .plots import plot_bench

        plot_bench(result, args.plot)
    print(f"identical: {result['identical']}  speedup ({result['best_mode']}): {result['speedup']:.2f}x  "
          f"tokens/pass: {result['tokens_per_pass']:.2f}  mean accepted: {result['mean_accepted']:.2f} "
          f"(adaptive-token drafts: {_number(result['mean_accepted_adaptive']):.2f})")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["identical"] else 1
