"""The shifted-reuse agreement tool (tools/shiftcheck.py): its edits land above the cursor only, and
one sample compares the three ways on a real (tiny) model, the exact one agreeing with the fresh."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from sdsat_lsp.tools.shiftcheck import EDIT_KINDS, apply_edit, edit_above, run_sample

from documents import WALK_MODULE as DOC  # tests/documents.py

TEXT = DOC * 3


@pytest.mark.parametrize("kind", EDIT_KINDS)
@pytest.mark.parametrize("seed", range(5))
def test_edits_land_above_the_cursor_line(kind, seed):
    rng = random.Random(seed)
    cursor = TEXT.index("count += 1", len(DOC) * 2) + 5
    line_start = TEXT.rfind("\n", 0, cursor) + 1
    lo = len(DOC)
    edited = apply_edit(TEXT, cursor, lo, kind, rng)
    assert edited is not None
    text, new_cursor = edited
    assert text != TEXT
    assert text[:lo] == TEXT[:lo]  # nothing before the window changes
    assert text[new_cursor - (cursor - line_start):] == TEXT[line_start:]  # the cursor's line and all after it stay
    if kind == "delete":
        assert len(TEXT) - len(text) > 1 and text.count("\n") == TEXT.count("\n") - 1
    if kind == "insert":
        assert text.count("\n") == TEXT.count("\n") + 1


def test_no_edit_without_a_line_above():
    assert edit_above("x = 1", 0, 3, "rename", random.Random(0)) is None


def test_one_sample_compares_shift_prefix_and_fresh(tiny_lm, tiny_model_dir):
    import dataclasses

    import torch

    from sdsat_lsp.growable_cache import GrowableCache
    from sdsat_lsp.modelcard import read_model_card
    from sdsat_lsp.settings import Settings

    model, tokenizer, _ = tiny_lm
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, card=read_model_card(tiny_model_dir))
    settings = dataclasses.replace(Settings(), time_budget_ms=0, deadline_ms=0, draft_store="off", max_tokens=8,
                                   max_prompt_tokens=256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cursor = TEXT.index("count += 1", len(DOC) * 2) + 5
        outcome = run_sample(loaded, lambda: GrowableCache(config=model.config), settings, TEXT, cursor,
                             ["rename", "insert"], 8, random.Random(0))
    finally:
        torch.set_num_threads(threads)
    assert outcome is not None and outcome.kind == "rename+insert"
    assert outcome.prefix_same  # the cache without shifting is exact
    assert outcome.shifted > 0 and outcome.fed["shift"] < outcome.fed["prefix"] < outcome.fed["fresh"] == outcome.prompt
