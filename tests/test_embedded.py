"""Installing a trained model as the embedded default: files, manifest, and a loadable result."""

from __future__ import annotations

import hashlib
import json

from sdsat_lsp.embedded import install_embedded
from sdsat_lsp.model import load_model


def test_install_embedded_writes_a_loadable_model_with_its_manifest(sdsat_micro_dir, tmp_path):
    target = tmp_path / "default"
    target.mkdir()
    (target / "stale.txt").write_text("from an older model")
    install_embedded(sdsat_micro_dir, {"made_by": "test"}, target=target)
    assert not (target / "stale.txt").exists()  # replaced as a whole, not merged
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["made_by"] == "test"
    weights = (target / "model.safetensors").read_bytes()
    assert manifest["sha256"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    loaded = load_model(target, quantize="none")
    assert loaded.card.adaptive_ids and loaded.card.k == 5


def test_the_shipped_embedded_model_is_the_default_and_decodes_identically():
    """The committed model loads offline, matches its manifest, and SDSAT output equals greedy."""
    from sdsat_lsp.embedded import EMBEDDED_DIR, default_model_ref, resolve_model
    from sdsat_lsp.engine import generate

    assert default_model_ref() == EMBEDDED_DIR
    manifest = json.loads((EMBEDDED_DIR / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((EMBEDDED_DIR / name).read_bytes()).hexdigest() == digest, name
    assert manifest["data"]["files_hash"] and manifest["eval_sdsat"]["exact_match"] is not None
    loaded = resolve_model(None)  # CPU default quantization
    card = loaded.card
    ids = loaded.tokenizer("import os\n\n\ndef walk(top):\n    for name in os.listdir(top):\n")["input_ids"]
    plain = generate(loaded.model, ids, mode="ar", max_new_tokens=32)
    fused = generate(loaded.model, ids, mode="fused", k=card.k, adaptive_ids=card.adaptive_ids, max_new_tokens=32)
    assert fused.tokens == plain.tokens and plain.tokens


def test_the_shipped_own_drafts_were_made_by_the_shipped_weights():
    """drafts.npy (the first tier of the embedded model's draft store) is the continuations of this
    model, not of one installed before it: a retrained model must distill again."""
    import numpy as np

    from sdsat_lsp.embedded import EMBEDDED_DIR

    recipe = json.loads((EMBEDDED_DIR / "drafts.json").read_text())
    assert recipe["model_sha256"] == hashlib.sha256((EMBEDDED_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert recipe["sha256"] == hashlib.sha256((EMBEDDED_DIR / "drafts.npy").read_bytes()).hexdigest()
    tokens = np.load(EMBEDDED_DIR / "drafts.npy")
    vocab = json.loads((EMBEDDED_DIR / "config.json").read_text())["vocab_size"]
    assert len(tokens) == recipe["tokens"] > 100_000 and 0 <= tokens.min() and tokens.max() < vocab
    assert json.loads((EMBEDDED_DIR / "sdsat.json").read_text())["draft_store"] == "stdlib"
