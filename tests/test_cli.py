"""`sdsat-lsp bench` end to end on the micro model, and bad input turned into clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdsat_lsp.cli import main
from sdsat_lsp.decoding import TREE_NODES

REQUIRED_KEYS = {"identical", "speedup", "tokens_per_pass", "mean_accepted", "ar_tokens_per_s", "sdsat_tokens_per_s",
                 "k", "model", "device", "modes"}


def test_bench_writes_json_with_fused_beside_two_pass(sdsat_micro_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    import shutil

    from sdsat_lsp.corpus import python_files
    from sdsat_lsp.training.micro import MICRO_FILES, MICRO_FILES_STRIDE

    # The micro model's own training files: it drafts well only on the code it learned (on the rest
    # of the standard library its drafts can all fail, depending on how the machine's tokenizers
    # build its BPE), and this test needs accepted drafts to tell fused from two-pass.
    source = tmp_path / "source"
    source.mkdir()
    for i, path in enumerate(python_files()[::MICRO_FILES_STRIDE][:MICRO_FILES]):
        shutil.copy(path, source / f"f{i}_{path.name}")
    code = main(["bench", "--model", str(sdsat_micro_dir), "--quantize", "none", "--k", "4", "--prompts", "3",
                 "--max-new-tokens", "24", "--prompt-chars", "600", "--source", str(source), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert REQUIRED_KEYS <= result.keys()
    assert result["identical"] is True and result["k"] == 4 and result["device"] == "cpu"
    for mode in ("ar", "two-pass", "fused", "hf-greedy", "hf-prompt-lookup"):
        assert mode in result["modes"]
    fused, two_pass = result["modes"]["fused"], result["modes"]["two-pass"]
    assert fused["identical"] and two_pass["identical"]
    # Our AR baseline is plain greedy decoding: Hugging Face's greedy generate() must agree.
    assert result["modes"]["hf-greedy"]["identical"]
    # Fused passes carry the next adaptive blocks beside the drafts they verify; two-pass ones do not.
    # (Whether drafts are accepted is the engine tests' business: test_engine.py shows fused saving
    # passes over two-pass on the micro model's own code. On bench prompts this session's fresh venv
    # trains a micro model whose adaptive drafts were never accepted, on the base code too.)
    assert fused["tokens_fed_per_pass"] > two_pass["tokens_fed_per_pass"] > 1
    assert fused["tokens_per_pass"] >= two_pass["tokens_per_pass"] >= 1
    assert result["modes"]["ar"]["tokens_per_pass"] == pytest.approx(1.0)
    assert result["modes"]["ar"]["mean_accepted_adaptive"] is None  # no pass verified adaptive drafts: not 0
    assert fused["mean_accepted_adaptive"] is not None  # it verified adaptive drafts (only those)
    assert fused["mean_accepted_adaptive"] == fused["mean_accepted"]
    table = capsys.readouterr().out
    assert "fused" in table and "two-pass" in table and "hf-prompt-lookup" in table


def test_bench_source_folder(sdsat_micro_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "mod.py").write_text("".join(f"def function_{i}(value):\n    return value * {i}\n\n" for i in range(40)))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(sdsat_micro_dir), "--quantize", "none", "--prompts", "2", "--max-new-tokens",
                 "8", "--source", str(src), "--no-hf", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["source"] == str(src)
    assert "fused+store" not in result["modes"] and result["draft_store"] == "none"  # the micro card names no store
    # A store of the same folder: the mode appears, drafts from it are verified, the output is unchanged.
    assert main(["bench", "--model", str(sdsat_micro_dir), "--quantize", "none", "--prompts", "2", "--max-new-tokens",
                 "16", "--source", str(src), "--draft-store", str(src), "--no-hf", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    store_mode, chain_mode = result["modes"]["fused+store"], result["modes"]["fused+store-chain"]
    assert result["identical"] and store_mode["identical"] and store_mode["store_passes"] > 0
    assert chain_mode["identical"] and chain_mode["store_passes"] > 0
    assert result["best_mode"] != "fused+store-chain"  # a comparison, never the headline
    assert result["draft_store"] == str(src) and result["draft_store_tokens"] > 400 and result["tree_nodes"] == TREE_NODES


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--k", "0"], "k must be at least 1"),
        (["--adaptive-ids", "99999"], "outside the model's vocabulary"),
        (["--prompt-chars", "40000", "--max-new-tokens", "900"], "exceeds the model's context"),
        (["--tree-nodes", "65"], "--tree-nodes must lie in 0..64"),
    ],
)
def test_bench_bad_input_is_a_clear_error(sdsat_micro_dir, capsys, extra, message):
    code = main(["bench", "--model", str(sdsat_micro_dir), "--quantize", "none", "--prompts", "1", "--no-hf", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_model_folder_is_a_clear_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdsat_lsp.cli", "bench", "--model", str(tmp_path / "nope"), "--prompts", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr
