"""Cost per pass of a model shape with random weights, eager against compiled (issue 18, for a
lent GPU): memory, ms per pass by tokens fed, AR and fused tokens/s, and whether the outputs of
every variant are identical. Random weights make acceptance meaningless (drafts are the adaptive
id's guesses of a random model): the point is the cost of a pass and the memory.

    python -m sdsat_lsp.tools.shapes --shape codellama-7b --device cuda --quantize none|nf4 --json out.json
    python -m sdsat_lsp.tools.shapes --shape tiny --device cpu            # the same code, in seconds

The weights are built on the device (no download). The AR pass is compared with the time it
takes to read the weights once at the bandwidth measured here (a device-to-device copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPES = {
    # CodeLlama-7B: the released SDSAT checkpoints' architecture.
    "codellama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32016, max_position_embeddings=16384, rope_theta=1e6),
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, rope_theta=1e4),
}


def build(shape: str, device: str, quantize: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(SHAPES[shape])
    theta = settings.pop("rope_theta")
    config = LlamaConfig(**settings, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         tie_word_embeddings=False)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    if quantize == "nf4":
        import bitsandbytes as bnb

        def swap(parent):
            for name, child in parent.named_children():
                if isinstance(child, torch.nn.Linear) and name != "lm_head":
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4", device="cpu")
                    q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
                    setattr(parent, name, q.to(device))
                else:
                    swap(child)

        swap(model)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return model


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bandwidth_gbs(device: str, megabytes: int = 1024) -> float:
    """Read+write bandwidth of a large copy, GB/s."""
    import torch

    n = megabytes * 2**20 // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    started = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    _sync(device)
    return 2 * 5 * a.numel() * 4 / (time.perf_counter() - started) / 1e9


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def pass_ms(model, device: str, sizes, past: int, repeats: int) -> dict:
    """Median ms of one pass feeding T tokens after `past` cached ones (the engine's entry)."""
    import torch

    from ..passes import forward_states
    from ..growable_cache import GrowableCache

    out = {}
    cache = GrowableCache(config=model.config)
    forward_states(model, cache, [1] * past, range(past))
    for size in sizes:
        times = []
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            states, head = forward_states(model, cache, [1] * size, range(past, past + size))
            head(states[-1:])
            _sync(device)
            times.append((time.perf_counter() - started) * 1e3)
            cache.crop(-size)
        out[str(size)] = round(statistics.median(times[1:] or times), 3)
    del torch
    return out


def decode(model, prompt, mode: str, tokens: int, adaptive: int):
    from ..engine import generate

    started = time.perf_counter()
    g = generate(model, prompt, mode=mode, k=4, adaptive_ids=[adaptive], max_new_tokens=tokens, eos_ids=[])
    return g, time.perf_counter() - started


def measure(shape: str, device: str, quantize: str, compile: bool = True, tokens: int = 64, past: int = 512,
            sizes=(1, 8, 16, 32), repeats: int = 10, progress=print) -> dict:
    import torch

    from ..compiled import CompiledForward, attach

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = build(shape, device, quantize)
    result = {"shape": shape, "device": device, "quantize": quantize, "build_s": round(time.perf_counter() - started, 1),
              "weight_bytes": weight_bytes(model)}
    if device.startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name(0)
        result["memory_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    bandwidth = bandwidth_gbs(device)
    result["bandwidth_gbs"] = round(bandwidth, 1)
    result["weights_read_floor_ms"] = round(result["weight_bytes"] / bandwidth / 1e6, 3)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(5, model.config.vocab_size, (past,), generator=generator).tolist()
    adaptive = 3
    variants = {"eager": None}
    if compile:
        compiled = CompiledForward.for_device(model)
        progress(f"{shape} {quantize}: compiling ...")
        compiled.warm_up()
        result["compile_s"] = round(compiled.compile_s, 1)
        variants["compiled"] = compiled
    outputs = {}
    for name, forward in variants.items():
        attach(model, forward)
        result[f"pass_ms_{name}"] = pass_ms(model, device, sizes, past, repeats)
        for mode in ("ar", "fused"):
            decode(model, prompt[:64], mode, 4, adaptive)  # warm
            gen, seconds = decode(model, prompt, mode, tokens, adaptive)
            outputs[(name, mode)] = gen.tokens
            result[f"{mode}_tokens_per_s_{name}"] = round(len(gen.tokens) / seconds, 2)
            result[f"{mode}_tokens_per_pass_{name}"] = round(gen.stats.tokens_per_pass, 3)
        progress(f"{shape} {quantize} {name}: {result[f'pass_ms_{name}']}")
    attach(model, None)
    reference = outputs[("eager", "ar")]
    result["identical"] = {f"{n}-{m}": tokens == reference for (n, m), tokens in outputs.items()}
    result["all_identical"] = all(result["identical"].values())
    if "pass_ms_compiled" in result:
        result["ar_pass_over_floor"] = round(result["pass_ms_compiled"]["1"] / result["weights_read_floor_ms"], 2)
    if device.startswith("cuda"):
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdsat_lsp.tools.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="codellama-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quantize", choices=("none", "nf4"), default="none")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--past", type=int, default=512)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)
    result = measure(args.shape, args.device, args.quantize, compile=args.compile, tokens=args.tokens, past=args.past,
                     progress=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(text + "\n")
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
