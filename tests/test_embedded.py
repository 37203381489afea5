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
