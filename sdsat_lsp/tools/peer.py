"""The peer in the bench: llama.cpp on the same model, the same prompts, the same greedy decoding.

`sdsat-lsp bench --peer llama.cpp` converts the model to GGUF (written here with the `gguf`
package: the tensor names and the q/k row order llama.cpp's Llama graph expects, f16 matrices,
f32 norms, our BPE as a "gpt2" vocabulary), and runs it through `llama-cpp-python`'s low-level API
with token ids, so that tokenization plays no part. The package is built from its sdist once
(cmake builds llama.cpp: minutes) into its own folder under ~/.cache/sdsat-lsp/peers, never into
the venv.

Modes: "ar", one token per `llama_decode`; "ngram", prompt-lookup drafts (the same n-gram index as
our fused+lookup: the last 3 tokens, up to 8 copied tokens) verified in one llama.cpp batch and
rolled back with `llama_memory_seq_rm`. llama.cpp's own n-gram speculation lives in its `common`
library, which the Python package does not expose, so this is that scheme rebuilt on its batches.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdsatError

LLAMA_CPP_VERSION = "0.3.36"
PEERS_DIR = Path(os.environ.get("SDSAT_LSP_CACHE", Path.home() / ".cache" / "sdsat-lsp")) / "peers"
PEER_MODES = ("ar", "ngram")
NGRAM = 3
NGRAM_TOKENS = 8


def package_dir() -> Path:
    return PEERS_DIR / f"llama-cpp-python-{LLAMA_CPP_VERSION}"


def ensure_package(progress=print) -> Path:
    """The built package's folder; builds it from the sdist when missing (minutes)."""
    target = package_dir()
    if (target / "llama_cpp" / "llama_cpp.py").is_file():
        return target
    progress(f"building llama-cpp-python {LLAMA_CPP_VERSION} from its sdist into {target} (cmake: several minutes) ...")
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1),
               CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                          "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-binary", "llama-cpp-python",
                           "--target", str(target), f"llama-cpp-python=={LLAMA_CPP_VERSION}"], env=env)
    if done.returncode != 0:
        raise SdsatError(f"building llama-cpp-python failed (exit {done.returncode}); see pip's output above")
    return target


def _low_level(progress=print):
    import importlib
    import types

    folder = ensure_package(progress)
    # The ctypes bindings only: the package's __init__ imports its high-level wrapper, whose
    # dependencies (diskcache, jinja2) the bench does not need, so the package is entered bare.
    if "llama_cpp" not in sys.modules:
        package = types.ModuleType("llama_cpp")
        package.__path__ = [str(folder / "llama_cpp")]
        sys.modules["llama_cpp"] = package
    return importlib.import_module("llama_cpp.llama_cpp")


# ---- GGUF ------------------------------------------------------------------------------------


def permute_for_gguf(weight, heads: int):
    """transformers' q/k rows (rotate-half pairs) -> the order llama.cpp's rope reads."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def convert_to_gguf(model_dir: Path, out: Path) -> Path:
    """Write the Llama model in `model_dir` (safetensors, tokenizer.json) as an f16 GGUF."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise SdsatError(f"the llama.cpp peer converts Llama models only (got {config.get('model_type')!r})")
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        raise SdsatError("the llama.cpp peer converts byte-level BPE tokenizers only")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(model_dir.name)
    _add_hyperparameters(writer, config)
    _add_vocabulary(writer, config, tok)
    _add_tensors(writer, config, tensors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _head_counts(config: dict) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a transformers Llama config."""
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    return heads, kv_heads, config.get("head_dim") or config["hidden_size"] // heads


def _add_hyperparameters(writer, config: dict) -> None:
    import gguf

    heads, kv_heads, head_dim = _head_counts(config)
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def _add_vocabulary(writer, config: dict, tok: dict) -> None:
    """Our byte-level BPE (tokenizer.json) as a "gpt2" vocabulary: one name per id up to the
    model's vocabulary size ([PADn] where the tokenizer has none), special and padding ids marked
    CONTROL, and the merges."""
    import gguf

    vocab = dict(tok["model"]["vocab"])
    special = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = config["vocab_size"]
    names = [f"[PAD{i}]" for i in range(size)]
    for text, index in vocab.items():
        if index < size:
            names[index] = text
    types = [gguf.TokenType.CONTROL if i in special or names[i].startswith("[PAD") else gguf.TokenType.NORMAL
             for i in range(size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(names)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    for key, adder in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                       ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(config.get(key), int):
            adder(config[key])
    writer.add_add_bos_token(False)


def _add_tensors(writer, config: dict, tensors: dict) -> None:
    """The weights under llama.cpp's tensor names: f16 matrices (q/k rows permuted for its rope),
    f32 norms; a tied output head is the embedding."""
    import numpy as np

    heads, kv_heads, _ = _head_counts(config)

    def put(name: str, array, matrix: bool = True) -> None:
        writer.add_tensor(name, np.ascontiguousarray(array.astype(np.float16 if matrix else np.float32)))

    put("token_embd.weight", tensors["model.embed_tokens.weight"])
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", tensors[p + "input_layernorm.weight"], matrix=False)
        put(f"blk.{i}.attn_q.weight", permute_for_gguf(tensors[p + "self_attn.q_proj.weight"], heads))
        put(f"blk.{i}.attn_k.weight", permute_for_gguf(tensors[p + "self_attn.k_proj.weight"], kv_heads))
        put(f"blk.{i}.attn_v.weight", tensors[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", tensors[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", tensors[p + "post_attention_layernorm.weight"], matrix=False)
        put(f"blk.{i}.ffn_gate.weight", tensors[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", tensors[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", tensors[p + "mlp.down_proj.weight"])
    put("output_norm.weight", tensors["model.norm.weight"], matrix=False)
    put("output.weight", tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]))


def gguf_for(model_dir: Path) -> Path:
    """The model's GGUF, converted once per weights file (keyed by its size and mtime)."""
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise SdsatError(f"no safetensors in {model_dir}: the llama.cpp peer converts those")
    stamp = "-".join(f"{w.stat().st_size}-{int(w.stat().st_mtime)}" for w in weights)
    out = PEERS_DIR / "gguf" / f"{model_dir.name}-{stamp}-f16.gguf"
    return out if out.is_file() else convert_to_gguf(model_dir, out)


# ---- decoding ------------------------------------------------------------------------------


@dataclass
class PeerRun:
    tokens: list[int]
    wall_ms: float
    prefill_ms: float
    forward_passes: int = 0
    verify_passes: int = 0
    drafts_accepted: int = 0
    tokens_fed: int = 0
    pass_costs: list[tuple[int, float]] = field(default_factory=list)

    @property
    def stats(self):
        """This run as the engine's DecodeStats (its drafts all come from prompt lookup), so that the
        bench reads the peer's runs and ours alike."""
        from ..engine import DecodeStats

        return DecodeStats(forward_passes=self.forward_passes, tokens_fed=self.tokens_fed,
                           drafts_accepted=self.drafts_accepted, verify_passes=self.verify_passes,
                           lookup_passes=self.verify_passes, lookup_accepted=self.drafts_accepted,
                           new_tokens=len(self.tokens), prefill_ms=self.prefill_ms, wall_ms=self.wall_ms,
                           pass_costs=list(self.pass_costs))


class LlamaCpp:
    """One llama.cpp model and context (greedy, one sequence)."""

    name = "llama.cpp"
    modes = PEER_MODES

    def __init__(self, gguf_path: Path, n_ctx: int, threads: int, progress=print):
        import numpy as np

        self.np = np
        lib = self.lib = _low_level(progress)
        # llama.cpp logs every load to stderr; the bench prints its own summary.
        self._quiet = lib.llama_log_callback(lambda level, text, data: None)
        lib.llama_log_set(self._quiet, None)
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not self.model:
            raise SdsatError(f"llama.cpp could not load {gguf_path}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = min(512, n_ctx)
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise SdsatError("llama.cpp could not create a context")
        self.memory = lib.llama_get_memory(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.n_batch = cparams.n_batch
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.threads = threads

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def _decode(self, tokens: list[int], start: int, all_logits: bool) -> None:
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == len(tokens) - 1
        if self.lib.llama_decode(self.ctx, batch) != 0:
            raise SdsatError("llama_decode failed")

    def _argmax(self, row: int) -> int:
        pointer = self.lib.llama_get_logits_ith(self.ctx, row)
        return int(self.np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)).argmax())

    def run(self, mode: str, prompt: list[int], max_new_tokens: int, eos_ids: list[int]) -> PeerRun:
        from ..drafting import NgramIndex

        started = time.perf_counter()
        self.lib.llama_memory_clear(self.memory, True)
        for at in range(0, len(prompt), self.n_batch):
            self._decode(prompt[at:at + self.n_batch], at, False)
        y = self._argmax(-1)
        run = PeerRun([], 0.0, (time.perf_counter() - started) * 1e3, forward_passes=1)
        lookup = NgramIndex(NGRAM, prompt) if mode == "ngram" else None
        base = len(prompt)
        while True:
            if y in eos_ids:
                break
            run.tokens.append(y)
            if len(run.tokens) >= max_new_tokens:
                break
            drafts = lookup.follow(y, NGRAM_TOKENS) if lookup is not None else []
            fed = [y] + drafts
            pass_started = time.perf_counter()
            self._decode(fed, base, bool(drafts))
            accepted = 0
            if drafts:
                while accepted < len(drafts) and self._argmax(accepted) == drafts[accepted]:
                    accepted += 1
                next_y = self._argmax(accepted)
                self.lib.llama_memory_seq_rm(self.memory, 0, base + 1 + accepted, -1)
                run.verify_passes += 1
                run.drafts_accepted += accepted
            else:
                next_y = self._argmax(-1)
            run.pass_costs.append((len(fed), (time.perf_counter() - pass_started) * 1e3))
            run.forward_passes += 1
            run.tokens_fed += len(fed)
            emitted = fed[:1 + accepted]
            if lookup is not None:
                lookup.extend(emitted)
            base += len(emitted)
            stop = False
            for token in drafts[:accepted]:
                if token in eos_ids:
                    stop = True
                    break
                run.tokens.append(token)
                if len(run.tokens) >= max_new_tokens:
                    stop = True
                    break
            if stop:
                break
            y = next_y
        run.wall_ms = (time.perf_counter() - started) * 1e3
        return run


def open_peer(name: str, model_dir: Path, n_ctx: int, threads: int, progress=print) -> LlamaCpp:
    if name != "llama.cpp":
        raise SdsatError(f"unknown peer {name!r}; the bench knows llama.cpp")
    return LlamaCpp(gguf_for(Path(model_dir)), n_ctx, threads, progress)
