"""`sdsat-lsp corpus`: what is left out (vendored, generated, huge, blobs, duplicates) and why, the
held-out split by whole packages, FIM examples in the server's prompt order, reproducible shards;
and the whole pipeline at a tiny size: corpus -> tokenizer -> FIM base training -> SDSAT
fine-tune with the recipe's options -> an engine whose drafts never change greedy output."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from sdsat_lsp.corpus import stdlib_dir
from sdsat_lsp.training.corpus import build_corpus, fim_document, load_corpus

STD_FILES = ("json/decoder.py", "json/encoder.py", "json/__init__.py", "json/scanner.py", "textwrap.py", "shlex.py",
             "glob.py", "fnmatch.py", "bisect.py", "heapq.py", "queue.py", "sched.py", "colorsys.py", "keyword.py")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A small "stdlib" and "site-packages" with one file of every kind the corpus must leave out."""
    base = tmp_path_factory.mktemp("roots")
    std, site = base / "std", base / "site"
    for name in STD_FILES:
        (std / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stdlib_dir() / name, std / name)
    for name in ("email/utils.py", "email/header.py", "email/charset.py", "email/quoprimime.py"):
        (site / "alpha").mkdir(parents=True, exist_ok=True)
        shutil.copy(stdlib_dir() / name, site / "alpha" / name.split("/")[1])
    (site / "alpha" / "_vendor").mkdir()
    shutil.copy(stdlib_dir() / "string.py", site / "alpha" / "_vendor" / "string.py")
    beta = site / "beta"
    beta.mkdir()
    shutil.copy(stdlib_dir() / "calendar.py", beta / "cal.py")
    (beta / "gen.py").write_text("# This file was automatically generated. Do not edit.\n" + "X = 1\n" * 100)
    (beta / "big.py").write_text("x = 1\n" * 200_000)  # 1.2 MB
    (beta / "blob.py").write_text("DATA = [" + ", ".join(str(i) for i in range(3000)) + "]\n")
    heapq = (stdlib_dir() / "heapq.py").read_text()
    (beta / "dup.py").write_text("\n".join(line + "  " for line in heapq.split("\n")))  # trailing spaces only
    textwrap = (stdlib_dir() / "textwrap.py").read_text()
    (beta / "near.py").write_text(textwrap.replace("TextWrapper", "LineWrapper", 3))
    return std, site


def _build(out, roots, **kw):
    std, site = roots
    options = dict(stdlib=std, site=site, seed=3, vocab_size=400, held_fraction=0.25, held_max_share=0.3,
                   shard_tokens=20_000, fim_chars=800, slot_tokens=5)
    options.update(kw)
    return build_corpus(out, **options)


@pytest.fixture(scope="module")
def corpus_dir(roots, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    _build(out, roots)
    return out


def test_corpus_leaves_out_what_it_should_and_holds_out_whole_packages(corpus_dir, roots, tmp_path):
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    ex = manifest["exclusions"]
    for reason in ("vendored", "generated", "over_1mb", "data_blob", "exact_duplicate", "near_duplicate"):
        assert ex.get(reason) == 1, (reason, ex)
    train = [line.split("\t") for line in (corpus_dir / "files.txt").read_text().splitlines()]
    held = [line.split("\t") for line in (corpus_dir / "held_files.txt").read_text().splitlines()]
    assert held and train
    train_pkgs, held_pkgs = {p for p, _ in train}, {p for p, _ in held}
    assert not train_pkgs & held_pkgs  # whole packages, never split
    assert sorted(held_pkgs) == manifest["held_out_packages"]
    kept = {rel for _, rel in train + held}
    assert "cal.py" not in kept and "beta/cal.py" in kept  # a package's own files keep their folder
    assert not {"beta/dup.py", "beta/near.py", "alpha/_vendor/string.py"} & kept
    assert set(manifest["tokens_per_package"]) == train_pkgs | held_pkgs
    assert manifest["seed"] == 3 and manifest["dtype"] == "uint16"
    assert len(manifest["tokenizer"]["adaptive_slots"]) == 5
    assert len(set(manifest["tokenizer"]["adaptive_slots"]) | {manifest["tokenizer"]["adaptive"]}) == 6

    data = load_corpus(corpus_dir)
    assert len(data["train"]) == manifest["train_tokens"] and len(data["held"]) == manifest["held_tokens"]
    fim = set(manifest["tokenizer"]["fim"].values())
    assert fim <= set(data["train"].tolist())  # FIM examples in training
    assert not fim & set(data["held"].tolist())  # held-out text stays plain (real-token loss)
    # The same inputs and seed give the same corpus, shard for shard; compressed shards load the same.
    again = _build(tmp_path / "again", roots, compress=True)
    assert again["file_list_hash"] == manifest["file_list_hash"]
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert torch.equal(load_corpus(tmp_path / "again")["train"], data["train"])
    other = _build(tmp_path / "seed", roots, seed=4, tokenizer_dir=corpus_dir / "tokenizer")
    assert other["held_out_packages"] != manifest["held_out_packages"] or other["shards"] != manifest["shards"]


def test_corpus_command_line_and_vocabulary_sweep(roots, tmp_path, capsys):
    from sdsat_lsp.cli import main

    std, site = roots
    out = tmp_path / "cli"
    assert main(["corpus", "--out", str(out), "--stdlib", str(std), "--site-packages", str(site), "--vocab-size", "300",
                 "--held-fraction", "0.25", "--held-max-share", "0.3", "--vocab-sweep", "300,600", "--compress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["file_list_hash"] == manifest["file_list_hash"] and manifest["compressed"]
    assert manifest["command"].startswith("sdsat-lsp ") and "--vocab-sweep" in manifest["command"]
    sweep = json.loads((out / "vocab_sweep.json").read_text())
    assert [r["vocab_size"] for r in sweep] == [300, 600]
    assert sweep[1]["tokens_per_line"] < sweep[0]["tokens_per_line"]  # a bigger vocabulary, fewer tokens
    assert all((out / f"{s['file']}.xz").is_file() for s in manifest["shards"])


def test_fim_examples_use_the_servers_spm_layout(corpus_dir):
    from transformers import AutoTokenizer

    from sdsat_lsp.prompt import build_prompt, encode
    from sdsat_lsp.training.tinymodel import FIM_TOKENS

    tok = AutoTokenizer.from_pretrained(corpus_dir / "tokenizer")
    ids = {role: tok.convert_tokens_to_ids(t) for role, t in FIM_TOKENS.items()}
    text = (stdlib_dir() / "bisect.py").read_text()[:700]
    text = text[: text.rfind("\n") + 1]
    orders = set()
    for seed in range(12):
        doc = fim_document(text, tok, ids, random.Random(seed))
        if doc[1] == ids["suffix"]:  # SPM: <pre><suf> suffix <mid> prefix middle
            orders.add("spm")
            mid = doc.index(ids["middle"])
            assert tok.decode(doc[mid + 1 :]) + tok.decode(doc[2:mid]) == text
        else:  # PSM: <pre> prefix <suf> suffix <mid> middle
            orders.add("psm")
            s, m = doc.index(ids["suffix"]), doc.index(ids["middle"])
            assert tok.decode(doc[1:s]) + tok.decode(doc[m + 1 :]) + tok.decode(doc[s + 1 : m]) == text
    assert orders == {"spm", "psm"}
    # With the hole at a cut point and no middle yet, an SPM example begins exactly as the
    # server's prompt for a cursor there (no leading specials with this tokenizer).
    rng = random.Random(0)
    for _ in range(5):
        cut = rng.randrange(1, len(text))
        spm = [ids["prefix"], ids["suffix"]] + encode(tok, text[cut:]) + [ids["middle"]] + encode(tok, text[:cut])
        prompt = build_prompt(text, cut, tok, max_tokens=4096, max_suffix_tokens=4096, fim_ids=ids)
        assert prompt.ids == spm


def test_tiny_pipeline_corpus_fim_base_sdsat_engine_identical(corpus_dir, tmp_path):
    import argparse

    from sdsat_lsp.engine import generate
    from sdsat_lsp.tools.evaluate import cut_fim_samples, run_eval
    from sdsat_lsp.model import load_model
    from sdsat_lsp.training.train import add_arguments, run_training

    def args(*argv):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return parser.parse_args(["--corpus", str(corpus_dir), "--seq-len", "64", "--batch-size", "4",
                                  "--eval-prompts", "0", "--checkpoint-every", "100", "--threads", "2", *argv])

    base = run_training(args("--out", str(tmp_path / "base"), "--arch", "layers=2,hidden=64,intermediate=128,heads=4,kv=2",
                             "--blocks-per-row", "0", "--steps", "40", "--lr", "3e-3"))
    assert base["corpus"]["held_out_packages"] and base["after"]["heldout_real_loss"] < 5.5
    sdsat = run_training(args("--out", str(tmp_path / "sdsat"), "--init", str(tmp_path / "base" / "model"),
                              "--peft", "none", "--targets", "greedy", "--blocks-per-row", "4", "--max-block", "4",
                              "--slot-ids", "--slot-decay", "0.8", "--soft-weight", "0.5", "--steps", "20",
                              "--lr", "1e-3", "--eval-prompts", "2"))
    assert sdsat["slot_ids"] and sdsat["after"]["mean_accepted_by_k"]
    lm = load_model(tmp_path / "sdsat" / "model", quantize="none", device="cpu")
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert lm.card.adaptive_ids == manifest["tokenizer"]["adaptive_slots"][:4]  # distinct ids, one per slot
    assert lm.card.fim == manifest["tokenizer"]["fim"]  # FIM-trained: the server may infill
    assert lm.card.corpus["file_list_hash"] == manifest["file_list_hash"]
    held = load_corpus(corpus_dir)["held"]
    for start in (0, 500, 1500):
        prompt = held[start : start + 40].tolist()
        want = generate(lm.model, prompt, mode="ar", max_new_tokens=24, eos_ids=[]).tokens
        for mode in ("two-pass", "fused"):
            for k in (2, 4):
                got = generate(lm.model, prompt, mode=mode, k=k, adaptive_ids=lm.card.adaptive_ids,
                               max_new_tokens=24, eos_ids=[]).tokens
                assert got == want, (mode, k)
    samples = cut_fim_samples(2, 2, source=stdlib_dir() / "json", seed=0)
    result = run_eval(lm, samples, 4, lm.card.adaptive_ids, max_new_tokens=12)
    assert result["fim_line"]["samples"] == 2 and result["fim_block"]["samples"] == 2
    assert result["line"]["samples"] == 0
