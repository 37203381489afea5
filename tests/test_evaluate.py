"""`sdsat-lsp eval`: samples cut from real files, scores that mean what they say."""

from __future__ import annotations

import json

import pytest

from sdsat_lsp.cli import main
from sdsat_lsp.tools.evaluate import block_after, cut_samples, edit_similarity


def test_edit_similarity():
    assert edit_similarity("return x", "return x") == 1.0
    assert edit_similarity("", "abc") == 0.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)


def test_block_after_stops_at_dedent_and_drops_trailing_blanks():
    lines = ["def f(x):", "    if x:", "        return 1", "", "    return 2", "", "def g():", "    pass"]
    assert block_after(lines, 0) == ["    if x:", "        return 1", "", "    return 2"]
    assert block_after(lines, 1) == ["        return 1"]


def test_samples_are_cut_from_the_real_text():
    samples = cut_samples(20, 10, seed=3)
    assert [s.task for s in samples].count("line") == 20 and [s.task for s in samples].count("block") == 10
    for s in samples:
        text = open(s.path, encoding="utf-8").read()
        where = text.find(s.prompt)
        assert where >= 0 and s.target
        after = text[where + len(s.prompt):]
        if s.task == "line":
            assert after.split("\n", 1)[0].rstrip() == s.target and not s.prompt.endswith("\n")
        else:
            assert s.prompt.rstrip("\n").endswith(":") and after.startswith(s.target.split("\n", 1)[0])
    assert cut_samples(5, 2, seed=3) == cut_samples(5, 2, seed=3)


def test_eval_command_writes_json(sdsat_micro_dir, tmp_path):
    out = tmp_path / "eval.json"
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text("import os\n\n" + "".join(f"def f{i}(a, b):\n    if a:\n        return a + {i}\n    return b\n\n" for i in range(30)))
    assert main(["eval", "--model", str(sdsat_micro_dir), "--quantize", "none", "--samples", "6", "--block-samples", "3",
                 "--fim-samples", "4", "--source", str(src), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"exact_match", "edit_similarity", "samples", "model"} <= result.keys()
    assert result["samples"] == 9 and result["line"]["samples"] == 6 and result["block"]["samples"] == 3
    # The micro model's card has FIM ids: the FIM tasks run beside, counted on their own.
    assert result["fim_samples"] == 4 and result["fim_line"]["samples"] == 2 and result["fim_block"]["samples"] == 2
    assert 0.0 <= result["exact_match"] <= 1.0 and 0.0 <= result["edit_similarity"] <= 1.0
