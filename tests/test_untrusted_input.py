"""Nothing runs or downloads because a setting or a file said so: hub ids download only with
--allow-download (and within a size cap), a model folder's own Python never runs, a training
checkpoint cannot run pickled code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from sdsat_lsp import model as model_module
from sdsat_lsp.errors import SdsatError


class _Hub:
    """Stands in for huggingface_hub's snapshot_download and HfApi: records what was asked."""

    def __init__(self, cached: bool = False, size: int = 1000):
        self.calls: list[dict] = []
        self.cached, self.size = cached, size

    def snapshot_download(self, repo, **kwargs):
        self.calls.append({"repo": repo, **kwargs})
        if kwargs.get("local_files_only") and not self.cached:
            raise FileNotFoundError("not in the cache")
        return "/tmp/snapshot"

    def model_info(self, repo, files_metadata=False):
        files = [SimpleNamespace(rfilename="model.safetensors", size=self.size),
                 SimpleNamespace(rfilename="pytorch_model.bin", size=10**12)]  # never fetched: not counted
        return SimpleNamespace(siblings=files)


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    fake = _Hub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: SimpleNamespace(model_info=fake.model_info))
    monkeypatch.delenv(model_module.DOWNLOAD_CAP_ENV, raising=False)
    return fake


def test_a_hub_id_is_only_looked_up_in_the_cache_without_the_opt_in(hub):
    with pytest.raises(SdsatError, match="--allow-download"):
        model_module.resolve_folder("someone/some-model")
    assert [c.get("local_files_only") for c in hub.calls] == [True]


def test_a_cached_hub_model_needs_no_opt_in(hub):
    hub.cached = True
    assert str(model_module.resolve_folder("someone/some-model")) == "/tmp/snapshot"
    assert all(c.get("local_files_only") for c in hub.calls)


def test_with_the_opt_in_the_size_is_checked_before_downloading(hub, monkeypatch):
    monkeypatch.setenv(model_module.DOWNLOAD_CAP_ENV, str(5000))
    hub.size = 6000
    with pytest.raises(SdsatError, match="more than"):
        model_module.resolve_folder("someone/big-model")
    assert not [c for c in hub.calls if not c.get("local_files_only")]  # nothing fetched
    hub.size = 4000
    assert str(model_module.resolve_folder("someone/small-model")) == "/tmp/snapshot"
    fetched = [c for c in hub.calls if not c.get("local_files_only")]
    assert [c["repo"] for c in fetched] == ["someone/small-model"]
    assert "*.bin" not in fetched[0]["allow_patterns"]


def test_the_command_line_opt_in_reaches_the_loader():
    """`--allow-download` (before or after the tool's name) sets the cap the loader reads; without
    it the same command says how to opt in."""
    env = {k: v for k, v in os.environ.items() if k != model_module.DOWNLOAD_CAP_ENV}
    env["HF_HUB_OFFLINE"] = "1"
    base = [sys.executable, "-m", "sdsat_lsp.cli"]
    without = subprocess.run([*base, "eval", "--model", "someone/not-cached"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert without.returncode == 2 and "--allow-download" in without.stderr, without.stderr
    after = subprocess.run([*base, "eval", "--allow-download", "--max-download-gb", "1", "--model", "someone/not-cached"],
                           capture_output=True, text=True, env=env, timeout=300)
    # Offline here: the opt-in gets as far as asking the hub for the size, which cannot be reached.
    assert after.returncode == 2 and "hub cannot be reached" in after.stderr, after.stderr


def test_a_model_folders_own_code_never_runs(tmp_path):
    """A config whose auto_map points at Python shipped beside the weights: the built-in class is
    used and that file is never imported (trust_remote_code=False)."""
    from sdsat_lsp.training.tinymodel import build_tiny_model, save_tiny, train_tokenizer

    tokenizer = train_tokenizer(vocab_size=512, max_files=5)
    folder = save_tiny(build_tiny_model(tokenizer, seed=0), tokenizer, tmp_path / "model", k=2)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                          "AutoConfig": "modeling_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = model_module.load_model(folder, quantize="none", device="cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_training_checkpoint_cannot_run_code(tmp_path):
    from sdsat_lsp.training.train import load_checkpoint

    marker = tmp_path / "ran"
    checkpoint = tmp_path / "checkpoint.pt"
    import torch

    torch.save({"step": 3, "trainable": {}, "rng": _Payload(str(marker))}, checkpoint)
    with pytest.raises(SdsatError, match="refusing"):
        load_checkpoint(checkpoint, "cpu")
    assert not marker.exists()
    torch.save({"step": 3, "rng": random_state()}, checkpoint)
    assert load_checkpoint(checkpoint, "cpu")["step"] == 3  # what train writes still loads


def random_state():
    import random

    return random.Random(0).getstate()
