"""A compiled decoder step for the engine's passes: the framework taken out of the forward pass.

Measured on the embedded model (issue 18): one eager decode pass through transformers costs about
3.6 ms on 2 CPU cores, of which the matmuls are 31%; the rest is ~990 torch operator calls plus the
Python between them (mask building, cache classes, output dataclasses, kwargs plumbing). This module
runs the same weights through one `torch.compile`d function per pass instead.

Why a decoder step of our own rather than `torch.compile(model)` with transformers' StaticCache:
the engine's passes need what that path does not give together: arbitrary 4-D masks (adaptive
blocks, draft trees whose nodes sit at the position of their depth), an in-place cache that is
cropped by moving a length and whose accepted tree nodes are moved into place (`GrowableCache`, also
the server's per-document cache), and a cache that persists across requests. The step below is
the Llama layer written against that cache; everything else is transformers' own modules (the
rotary embedding, the RMS norms, quantized linears it cannot see into), so rope scaling and
quantization stay theirs. It covers Llama-shaped models (q/k/v/o, gated SiLU MLP, RMS norms,
full attention); anything else keeps the eager path (`supported`).

Shapes: on CPU the step is compiled with dynamic shapes (one graph for one token, one for more:
no padding, the tokens fed are the cost there). On CUDA, CUDA graphs want static shapes, so tokens
are padded to buckets and the attended cache to a multiple of `kv_block`; padded rows write KV past
the cache's length (never read: the length does not move over them) and the real rows' mask hides
them.

Outputs: the compiled step is a different float program from transformers' eager forward (fused
kernels, another summation order), so its logits differ in the last bits; what is guaranteed, and
tested, is that greedy SDSAT decoding through it equals greedy AR decoding through it, as for the
eager path. Compilation is cached on disk (inductor's FX graph cache under
~/.cache/sdsat-lsp/inductor) and runs in the background (`start_background`): until it is done the
engine uses the eager path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("SDSAT_LSP_CACHE", Path.home() / ".cache" / "sdsat-lsp")) / "inductor"
# Passes feeding more tokens than this (long prefill chunks) stay eager: they are matmul-bound
# already (the issue measured our prefill at or above llama.cpp's), and dynamic shapes are compiled
# for the decode sizes.
MAX_TOKENS = 64
CUDA_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CUDA_KV_BLOCK = 256


def _use_disk_cache() -> None:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True


def _register_fp16_linear():
    """torch's dynamic fp16 Linear (fbgemm fp16 weights, fp32 activations: the CPU default) as an op
    the compiler can place: the aten op has no shape function, so give it one."""
    if hasattr(torch.ops, "sdsat") and hasattr(torch.ops.sdsat, "linear_fp16"):
        return torch.ops.sdsat.linear_fp16

    @torch.library.custom_op("sdsat::linear_fp16", mutates_args=())
    def linear_fp16(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
        return torch.ops.aten.fbgemm_linear_fp16_weight_fp32_activation(x, packed, bias)

    @linear_fp16.register_fake
    def _(x, packed, bias, out_features):
        return x.new_empty((*x.shape[:-1], out_features))

    return torch.ops.sdsat.linear_fp16


class _Linear:
    """One or more of the model's linears applied to the same input, concatenated along the output
    (q|k|v and gate|up: fewer, larger matmuls). Plain weights are concatenated; fbgemm fp16 weights
    are unpacked to fp16 (exact), concatenated and packed again; any other module (bitsandbytes,
    our rowwise int8) is called as it is, one by one."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        self.modules = list(modules)
        self.sizes = [self._out_features(m) for m in modules]
        self.kind = "modules"
        if all(type(m) is torch.nn.Linear for m in modules):
            self.kind = "dense"
            self.weight = torch.cat([m.weight.detach() for m in modules]).contiguous()
            biases = [m.bias for m in modules]
            self.bias = None if all(b is None for b in biases) else torch.cat(
                [b.detach() if b is not None else torch.zeros(n, dtype=self.weight.dtype) for b, n in zip(biases, self.sizes)])
        elif all(type(m) is DynamicLinear and m._packed_params.dtype == torch.float16 for m in modules):
            self.kind = "fp16"
            self.op = _register_fp16_linear()
            weights, biases = zip(*(m._weight_bias() for m in modules))
            weight = torch.cat([w.float() for w in weights])
            self.packed = torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(weight)
            # No bias is passed as None: a zero bias is still an add per call (~10 us).
            self.bias = None if all(b is None for b in biases) else torch.cat(
                [b if b is not None else torch.zeros(n) for b, n in zip(biases, self.sizes)])
            self.out_features = sum(self.sizes)

    @staticmethod
    def _out_features(m) -> int:
        return int(getattr(m, "out_features"))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "dense":
            out = F.linear(x, self.weight, self.bias)
        elif self.kind == "fp16":
            out = self.op(x, self.packed, self.bias, self.out_features)
        else:
            return [m(x) for m in self.modules]
        return list(out.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [out]


def supported(model) -> str | None:
    """None when the compiled step covers this model, else why not."""
    config = model.config
    decoder = getattr(model, "model", None)
    if getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        return f"model type {getattr(config, 'model_type', None)!r} is not Llama-shaped"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "final_logit_softcapping", None):
        return "not a gated-SiLU Llama"
    if decoder is None or not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "layers"):
        return "no decoder with a rotary embedding"
    layer = decoder.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not hasattr(layer.self_attn, name):
            return f"attention without {name}"
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(layer.mlp, name):
            return f"MLP without {name}"
    return None


class CompiledForward:
    """The engine's forward pass through a compiled decoder step (see the module docstring).

    `accepts(cache, n)` says whether a pass of n tokens onto `cache` can go this way (ready, a
    `GrowableCache`, n small enough); `states(cache, ids, positions, mask)` runs it and returns the
    final hidden states (T, hidden), exactly as the eager decoder's `last_hidden_state[0]`."""

    def __init__(self, model, *, compile: bool = True, buckets: Sequence[int] | None = None,
                 kv_block: int | None = None, mode: str | None = None, max_tokens: int = MAX_TOKENS):
        why = supported(model)
        if why is not None:
            raise ValueError(f"no compiled forward for this model: {why}")
        config = model.config
        decoder = model.model
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.layers = [
            (layer.input_layernorm, _Linear([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
             _Linear([layer.self_attn.o_proj]), layer.post_attention_layernorm,
             _Linear([layer.mlp.gate_proj, layer.mlp.up_proj]), _Linear([layer.mlp.down_proj]))
            for layer in decoder.layers
        ]
        self.buckets = tuple(sorted(buckets)) if buckets else None
        self.kv_block = kv_block
        self.max_tokens = min(max_tokens, self.buckets[-1]) if self.buckets else max_tokens
        self.compiled = compile
        self.ready = not compile  # the eager step needs no warm-up
        self.error: str | None = None
        self.compile_s: float | None = None
        if compile:
            _use_disk_cache()
            # Static shapes where CUDA graphs want them; elsewhere one graph serves every size.
            # The weights are ours and never change: checking every module's tensors on every call
            # (dynamo's guards) cost ~0.1 ms a pass; tensor guards on the inputs stay.
            # Sizes are marked dynamic where they vary (`_mark_dynamic`), not with dynamic=True: that
            # also made the model's head counts symbolic, and guards on them recompiled.
            # torch.compile takes a mode or options, not both: a mode is spelled as its options.
            options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            self._run = torch.compile(self._step, fullgraph=True, options=options)
        else:
            self._run = self._step

    @classmethod
    def for_device(cls, model, compile: bool = True) -> CompiledForward:
        """The settings for the model's device: CUDA graphs over padded buckets on CUDA, dynamic
        shapes on CPU."""
        if model.get_input_embeddings().weight.device.type == "cuda":
            return cls(model, compile=compile, buckets=CUDA_BUCKETS, kv_block=CUDA_KV_BLOCK,
                       mode="reduce-overhead" if compile else None)
        return cls(model, compile=compile)

    # -- the step ---------------------------------------------------------------------------

    def _step(self, ids, positions, mask, slots, keys: list[torch.Tensor], values: list[torch.Tensor]):
        tokens = ids.shape[0]
        span = mask.shape[-1]
        x = self.embed(ids[None])
        cos, sin = self.rotary(x, positions[None])
        cos, sin = cos[:, None], sin[:, None]
        half = self.head_dim // 2
        for (norm1, qkv, out, norm2, gate_up, down), key_buffer, value_buffer in zip(self.layers, keys, values):
            q, k, v = qkv(norm1(x))
            q = q.view(1, tokens, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(1, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(1, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
            key_buffer.index_copy_(2, slots, k.to(key_buffer.dtype))
            value_buffer.index_copy_(2, slots, v.to(value_buffer.dtype))
            attn = self._attention(q, key_buffer[:, :, :span], value_buffer[:, :, :span], mask, tokens, span)
            x = x + out(attn)[0]
            gate, up = gate_up(norm2(x))
            x = x + down(F.silu(gate) * up)[0]
        return self.norm(x)[0]

    def _attention(self, q, keys, values, mask, tokens: int, span: int):
        """Attention of the (1, heads, T, d) queries over the cache, as two batched matmuls and a
        softmax the compiler fuses with the mask: for the few rows of a decode pass, the
        scaled_dot_product_attention CPU kernel cost ~0.13 ms a call (profile, embedded model),
        most of a layer. Query heads sharing a KV head are stacked as rows of one matmul. (A fused
        multiply-and-sum for one query row measured slower: 3.6 against 2.8 ms a pass.)"""
        rep = self.heads // self.kv_heads
        q = q.reshape(1, self.kv_heads, rep * tokens, self.head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3)).view(1, self.kv_heads, rep, tokens, span)
        probs = torch.softmax(scores.float() * self.scale + mask.float(), dim=-1).to(values.dtype)
        attn = torch.matmul(probs.view(1, self.kv_heads, rep * tokens, span), values)
        return attn.view(1, self.heads, tokens, self.head_dim).transpose(1, 2).reshape(1, tokens, self.heads * self.head_dim)

    # -- the engine's side --------------------------------------------------------------------

    def accepts(self, cache, tokens: int) -> bool:
        from .growable_cache import GrowableLayer

        return (self.ready and 0 < tokens <= self.max_tokens and bool(cache.layers)
                and len(cache.layers) == len(self.layers) and all(type(layer) is GrowableLayer for layer in cache.layers))

    def _bucket(self, tokens: int) -> int:
        if self.buckets is None:
            return tokens
        return next(b for b in self.buckets if b >= tokens)

    def states(self, cache, ids: Sequence[int], positions: Sequence[int], mask: torch.Tensor | None) -> torch.Tensor:
        """One pass appending `ids` (at `positions`, under the engine's additive (1, 1, T, past + T)
        mask, causal when None) to `cache`; returns (T, hidden) final hidden states."""
        tokens = len(ids)
        padded = self._bucket(tokens)
        past = cache.layers[0].length
        span = past + padded
        if self.kv_block:
            span = -(-span // self.kv_block) * self.kv_block
        dtype = self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.float32
        with torch.inference_mode():
            self._reserve(cache, span, dtype)
            ids_t = torch.tensor(list(ids) + [0] * (padded - tokens), dtype=torch.long)
            pos = list(positions)
            pos_t = torch.tensor(pos + [pos[-1]] * (padded - tokens), dtype=torch.long)
            slots = torch.arange(past, past + padded, dtype=torch.long)
            blocked = torch.finfo(dtype).min
            if mask is None and self.buckets is None:
                # Causal over the cache and the new tokens: a row sees up to its own column.
                full = torch.zeros(tokens, span, dtype=dtype)
                if tokens > 1:
                    full[:, past:].masked_fill_(torch.ones(tokens, tokens, dtype=torch.bool).triu(1), blocked)
            else:
                full = torch.full((padded, span), blocked, dtype=dtype)
                if mask is None:
                    full[:tokens, :past] = 0
                    full[:tokens, past:past + tokens].masked_fill_(torch.ones(tokens, tokens, dtype=torch.bool).tril(), 0)
                else:
                    full[:tokens, :past + tokens] = mask[0, 0].to(device="cpu", dtype=dtype)
                full[tokens:, 0] = 0  # padded rows see something, so that no row is all blocked
            if self.device.type != "cpu":
                ids_t, pos_t, slots, full = (t.to(self.device, non_blocking=True) for t in (ids_t, pos_t, slots, full))
            keys = [layer._key_buffer for layer in cache.layers]
            values = [layer._value_buffer for layer in cache.layers]
            if self.compiled:
                # Padded buckets (CUDA) keep the tokens static; the cache's length stays symbolic
                # either way, or every new buffer size would be a graph of its own.
                self._mark_dynamic(tokens if self.buckets is None else 1, (ids_t, pos_t, slots, full), full, keys + values)
            out = self._run(ids_t, pos_t, full, slots, keys, values)
            if self.buckets is not None and self.compiled and self.device.type == "cuda":
                out = out.clone()  # CUDA graph outputs are overwritten by the next replay
            for layer in cache.layers:
                layer.length = past + tokens
                layer._expose()
        return out[:tokens]

    @staticmethod
    def _mark_dynamic(tokens: int, per_token, mask, buffers) -> None:
        """One graph for every cache length and one for every pass of more than one token (a size
        of 1 is always its own graph): the sizes that vary are symbolic from the first call."""
        mark = torch._dynamo.maybe_mark_dynamic
        if mask.shape[-1] > 1:
            mark(mask, 1)
        for buffer in buffers:
            mark(buffer, 2)
        if tokens > 1:
            for tensor in per_token:
                mark(tensor, 0)

    def _reserve(self, cache, span: int, dtype) -> None:
        """Room for `span` positions in every layer's buffer (the padded rows' KV goes there too)."""
        for layer in cache.layers:
            if layer.capacity < span:
                like = torch.empty(1, self.kv_heads, 0, self.head_dim, dtype=dtype, device=self.device)
                if not layer.is_initialized:
                    layer.lazy_initialization(like, like)
                # Round up so that a growing document does not change the buffers' shape each pass.
                layer._grow(max(span, 2 * layer.capacity), like, like)

    # -- compilation --------------------------------------------------------------------------

    def warm_up(self, sizes: Sequence[int] = (1, 2)) -> float:
        """Compile (or load from the disk cache) the graphs for these pass sizes on a scratch cache;
        returns the seconds taken and marks the step ready (a failure leaves it as it was)."""
        from .growable_cache import GrowableCache

        started = time.perf_counter()
        if self.buckets is not None:
            sizes = self.buckets
        cache = GrowableCache(config=self.model.config)
        # `states` does not ask `ready` (the engine does, through `accepts`): the worker keeps
        # decoding eagerly while this compiles.
        past = 3  # a cache of one position would be a graph of its own (sizes of 1 are)
        self.states(cache, [0] * past, range(past), None)
        for size in sizes:
            self.states(cache, [0] * size, range(past, past + size), None)
            cache.crop(-size)
        self.ready = True
        self.compile_s = time.perf_counter() - started
        return self.compile_s

    def start_background(self, on_done=None) -> threading.Thread:
        """Warm up in a daemon thread at low priority; the engine uses the eager path until then.
        `on_done(error_or_None)` is called from that thread."""

        def work() -> None:
            try:
                try:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
                except (AttributeError, OSError):
                    pass
                self.warm_up()
                log.info("compiled forward ready after %.1f s", self.compile_s)
                error = None
            except Exception as exc:  # the eager path stays; say why
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("compiled forward unavailable, staying eager: %s", self.error)
                error = self.error
            if on_done is not None:
                on_done(error)

        thread = threading.Thread(target=work, name="sdsat-compile", daemon=True)
        thread.start()
        return thread


def attach(model, forward: CompiledForward | None) -> None:
    """Make the engine use `forward` for this model's passes (None: the eager path again)."""
    model.__dict__["sdsat_forward"] = forward


def attached(model) -> CompiledForward | None:
    return model.__dict__.get("sdsat_forward")


def compile_beside(model, wanted: bool, report) -> dict:
    """Detach any compiled forward from `model`, then (when `wanted` and supported) compile a new
    one in the background; returns the state now ({"state": off | unsupported | compiling}) and
    later calls `report(info, message)` from the compiling thread with the final state. A later
    call supersedes an earlier one still under way: that one neither attaches nor reports."""
    epoch = model.__dict__.get("sdsat_compile_epoch", 0) + 1
    model.__dict__["sdsat_compile_epoch"] = epoch
    attach(model, None)
    if not wanted:
        return {"state": "off"}
    why = supported(model)
    if why is not None:
        return {"state": "unsupported", "message": why}

    def current() -> bool:
        return model.__dict__.get("sdsat_compile_epoch") == epoch

    def finished(compiled: CompiledForward, error: str | None) -> None:
        if not current():
            return
        if error is None:
            report({"state": "ready", "seconds": round(compiled.compile_s, 1)},
                   f"compiled forward ready ({compiled.compile_s:.1f} s)")
        else:
            attach(model, None)
            report({"state": "error", "message": error}, f"compiled forward unavailable, staying eager: {error}")

    def build() -> None:
        # Building the step allocates its static buffers, seconds on a busy CPU: on this thread,
        # never the caller's (the server calls from its event loop).
        try:
            compiled = CompiledForward.for_device(model)
        except Exception as exc:
            log.warning("compiled forward unavailable, staying eager: %s: %s", type(exc).__name__, exc)
            if current():
                report({"state": "error", "message": f"{type(exc).__name__}: {exc}"},
                       f"compiled forward unavailable, staying eager: {type(exc).__name__}: {exc}")
            return
        if current():
            attach(model, compiled)  # not ready yet: the engine passes it by
            compiled.start_background(lambda error: finished(compiled, error))

    threading.Thread(target=build, name="sdsat-compile-build", daemon=True).start()
    return {"state": "compiling"}
