"""The bench's peer: the GGUF it writes holds the tensors llama.cpp's Llama graph reads (q/k rows
in its rope order), and the bench reports a peer's modes under `peers` with the keys of ours.
(llama.cpp itself is built only by `bench --peer llama.cpp`: minutes of cmake, not a test.)"""

from __future__ import annotations

import numpy as np

from sdsat_lsp.tools.bench import run_bench
from sdsat_lsp.tools.peer import PeerRun, convert_to_gguf, permute_for_gguf


def test_gguf_holds_every_tensor_in_llama_cpp_order(sdsat_micro_dir, tmp_path):
    import gguf
    from safetensors.numpy import load_file

    out = convert_to_gguf(sdsat_micro_dir, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    source = load_file(str(sdsat_micro_dir / "model.safetensors"))
    layers = sum(1 for name in source if name.endswith("input_layernorm.weight"))
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= tensors.keys()
    assert len([n for n in tensors if n.startswith("blk.")]) == 9 * layers
    heads = int(reader.fields["llama.attention.head_count"].parts[-1][0])
    q = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(source["model.layers.0.self_attn.q_proj.weight"].shape)
    original = source["model.layers.0.self_attn.q_proj.weight"].astype(np.float16)
    assert np.array_equal(q, permute_for_gguf(original, heads))
    assert not np.array_equal(q, original)  # the permutation did something
    vocab = reader.fields["tokenizer.ggml.tokens"]
    assert len(vocab.data) == source["model.embed_tokens.weight"].shape[0]


class EchoPeer:
    """A peer that answers with our own engine's AR tokens (and one mode that differs)."""

    name = "echo"
    modes = ("ar", "wrong")
    threads = 1

    def __init__(self, model):
        self.model = model

    def run(self, mode, prompt, max_new_tokens, eos_ids):
        from sdsat_lsp.engine import generate

        g = generate(self.model, prompt, mode="ar", max_new_tokens=max_new_tokens, eos_ids=eos_ids)
        tokens = g.tokens if mode == "ar" else [t + 1 for t in g.tokens]
        return PeerRun(tokens, g.stats.wall_ms, g.stats.prefill_ms, forward_passes=g.stats.forward_passes,
                       tokens_fed=len(tokens), pass_costs=[(1, 0.5)] * len(tokens))


def test_bench_reports_a_peer_with_the_keys_of_our_modes(sdsat_micro, code_prompts):
    from types import SimpleNamespace

    model, _, adaptive = sdsat_micro
    loaded = SimpleNamespace(model=model)
    result = run_bench(loaded, [p[:60] for p in code_prompts[:2]], k=3, adaptive_ids=[adaptive], max_new_tokens=12,
                       with_hf=False, peer=EchoPeer(model))
    peers = result["peers"]["echo"]
    assert set(peers) == {"ar", "wrong"}
    assert peers["ar"]["identical"] is True and peers["wrong"]["identical"] is False
    assert set(result["modes"]["ar"]) <= set(peers["ar"])
    assert peers["ar"]["ms_per_pass_by_tokens_fed"] == {"1": 0.5}
    ours = result["modes"]["fused"]
    assert len(ours["per_prompt_ms"]) == 2 and ours["prefill_ms"] > 0
    fed = ours["passes_by_tokens_fed"]
    assert sum(fed.values()) == ours["forward_passes"] - 2  # every pass but the two prefills
    assert set(fed) == set(ours["ms_per_pass_by_tokens_fed"])


def test_plots_draw_the_bench_and_the_session(tmp_path):
    from sdsat_lsp.tools.plots import plot_bench, plot_session

    entry = {"tokens_per_s": 100.0, "mean_accepted": 1.5}
    result = {"modes": {"ar": {"tokens_per_s": 50.0, "mean_accepted": 0.0}, "fused": entry},
              "peers": {"llama.cpp": {"ar": entry}}, "model": "m", "prompts": 2, "max_new_tokens": 8}
    plot_bench(result, str(tmp_path / "bench.png"))
    plot_session({"latencies_ms": [10.0, 20.0, 30.0], "nocache_latencies_ms": [40.0, 50.0], "requests": 3},
                 str(tmp_path / "session.png"))
    for name in ("bench.png", "session.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shapes_measure_a_small_shape_on_cpu():
    """The GPU script's measurement, on a tiny shape and eagerly: every variant identical."""
    from sdsat_lsp.tools.shapes import measure

    result = measure("tiny", "cpu", "none", compile=False, tokens=8, past=16, sizes=(1, 4), repeats=2,
                     progress=lambda message: None)
    assert result["all_identical"] is True and set(result["identical"]) == {"eager-ar", "eager-fused"}
    assert set(result["pass_ms_eager"]) == {"1", "4"} and result["weights_read_floor_ms"] > 0
