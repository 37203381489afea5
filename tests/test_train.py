"""The SDSAT recipe: its batches honour the inference contract, it teaches drafting (acceptance
rises clearly) without touching what real tokens see, and `sdsat-lsp train` resumes exactly."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sdsat_lsp.engine import generate
from sdsat_lsp.training.train import (acceptance_by_k, add_arguments, greedy_block_targets, make_sdsat_batch, run_training,
                              sample_anchors, train_steps)


def test_block_outputs_equal_the_inference_contract(sdsat_micro, code_stream):
    """A block appended at anchor t computes what inference computes for [x_0..x_t, A x L], and
    real tokens compute exactly what they compute without any block."""
    model, _, adaptive = sdsat_micro
    T, L = 64, 5
    x = torch.tensor([code_stream[100 : 100 + T]])
    batch = make_sdsat_batch(x, [adaptive], L, 4, random.Random(3))
    with torch.inference_mode():
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask).logits[0]
        torch.testing.assert_close(out[:T], model(input_ids=x).logits[0], atol=1e-5, rtol=1e-5)
        for b in range(4):
            s = T + b * L
            t = int(batch.position_ids[0, s]) - 1
            ref = model(input_ids=torch.cat([x[:, : t + 1], torch.tensor([[adaptive] * L])], 1)).logits[0, t + 1 :]
            torch.testing.assert_close(out[s : s + L], ref, atol=1e-4, rtol=1e-4)
            # Labels: slot j of the block stands for x_{t+j+1}.
            want = x[0, t + 2 : t + 2 + L]
            assert batch.labels[0, s : s + len(want)].tolist() == want.tolist()


def test_greedy_block_targets_are_the_models_own_greedy_continuation(sdsat_micro, code_stream):
    """Self-distillation targets for anchor t equal tokens 2..L+1 of plain greedy decoding of
    x_0..x_t (all anchors of a batch computed together through one cache)."""
    model, _, _ = sdsat_micro
    T, L = 48, 4
    x = torch.tensor([code_stream[300 : 300 + T], code_stream[900 : 900 + T]])
    anchors = sample_anchors(2, T, 5, random.Random(7))
    targets = greedy_block_targets(model, x, anchors, L)
    for b in range(2):
        for i, t in enumerate(anchors[b]):
            greedy = generate(model, x[b, : t + 1].tolist(), mode="ar", max_new_tokens=L + 1, eos_ids=[]).tokens
            assert targets[b, i].tolist() == greedy[1:], (b, t)


def _fresh_micro(tokenizer):
    from sdsat_lsp.training.tinymodel import build_tiny_model

    return build_tiny_model(tokenizer, seed=0)


def test_recipe_raises_acceptance_and_needs_the_adaptive_loss(sdsat_micro, code_stream):
    """The trained micro model drafts far better than the same model untrained, and training with
    the adaptive loss switched off does not get there: the adaptive-token training is what works."""
    trained, tokenizer, adaptive = sdsat_micro
    held = torch.tensor(code_stream)
    before = acceptance_by_k(_fresh_micro(tokenizer), held, [adaptive], 3, prompts=8, max_new_tokens=32)
    after = acceptance_by_k(trained, held, [adaptive], 3, prompts=8, max_new_tokens=32)
    no_adaptive = _fresh_micro(tokenizer)
    train_steps(no_adaptive, code_stream, [adaptive], steps=300, seq_len=128, batch_size=8, max_block=5,
                blocks_per_row=8, lr=5e-3, adaptive_weight=0.0)
    control = acceptance_by_k(no_adaptive, held, [adaptive], 3, prompts=8, max_new_tokens=32)
    for k in (1, 2, 3):
        assert after[k] > before[k] + 0.3, (before, after)
        assert after[k] > control[k] + 0.2, (control, after)


def _args(out, source, **overrides):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--out", str(out), "--arch", "micro", "--vocab-size", "320", "--steps", "6", "--seq-len", "64",
            "--batch-size", "2", "--max-block", "3", "--checkpoint-every", "2", "--eval-prompts", "2", "--source", str(source)]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    import shutil

    from sdsat_lsp.corpus import stdlib_dir

    src = tmp_path_factory.mktemp("src")
    for name in ("json/decoder.py", "json/encoder.py", "json/__init__.py", "json/scanner.py", "textwrap.py", "shlex.py",
                 "glob.py", "fnmatch.py", "bisect.py", "heapq.py", "colorsys.py", "keyword.py", "queue.py", "sched.py"):
        dest = src / name.replace("/", "_")
        shutil.copy(stdlib_dir() / name, dest)
    return src


def test_resume_after_a_stop_equals_one_uninterrupted_run(tmp_path, small_source):
    straight = run_training(_args(tmp_path / "straight", small_source))
    run_training(_args(tmp_path / "chunked", small_source, stop_after=3))
    assert not (tmp_path / "chunked" / "model").exists()
    chunked = run_training(_args(tmp_path / "chunked", small_source))
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "chunked" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    assert straight["after"]["heldout_real_loss"] == pytest.approx(chunked["after"]["heldout_real_loss"], rel=1e-5)
    # Trained from scratch: "before" is random weights, whose loss is about ln(vocab).
    assert "random" in straight["before"]["note"]
    assert straight["after"]["heldout_real_loss"] < math.log(320) - 0.1
    assert set(straight["after"]["mean_accepted_by_k"]) == {1, 2, 3}


def test_time_budget_lowers_the_step_count_and_a_resume_keeps_it(tmp_path, small_source):
    """--time-budget: a run asked for far more steps than the budget affords stops near the budget,
    the report records the steps it ran, the log shows the held-out curve, and a resume does not
    go back to the step count on the command line."""
    import time

    out = tmp_path / "budget"
    started = time.perf_counter()
    # Stopped before the budget could measure the speed: the count is not settled yet...
    run_training(_args(out, small_source, steps=100_000, time_budget=4, stop_after=10, checkpoint_every=10))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["steps"] == 100_000
    # ...so the resumed run measures it and sets it.
    run_training(_args(out, small_source, steps=100_000, time_budget=4, stop_after=60, checkpoint_every=10))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert 35 < checkpoint["steps"] < 100_000
    report = run_training(_args(out, small_source, steps=100_000, time_budget=4, checkpoint_every=10))
    assert report["steps"] == checkpoint["steps"] and report["time_budget"] == 4
    assert time.perf_counter() - started < 120
    curve = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert curve[-1]["step"] == report["steps"]
    assert all(math.isfinite(entry["heldout_real_8"]) for entry in curve)


@pytest.mark.parametrize("flag", ["steps", "time_budget", "warmup"])
def test_non_positive_step_settings_are_refused_before_any_work(tmp_path, small_source, flag):
    from sdsat_lsp.errors import SdsatError

    with pytest.raises(SdsatError, match=flag.replace("_", "-")):
        run_training(_args(tmp_path / "bad", small_source, **{flag: 0}))
    assert not (tmp_path / "bad").exists()


def test_without_a_budget_a_resume_follows_the_command_lines_steps(tmp_path, small_source):
    """A schedule can be stretched: resuming with more --steps trains to the new count."""
    out = tmp_path / "stretch"
    run_training(_args(out, small_source, stop_after=3))  # --steps 6
    report = run_training(_args(out, small_source, steps=8))
    assert report["steps"] == 8
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 8


def test_adaptive_rows_only_keeps_real_token_outputs_bitwise(tiny_lm):
    """With only the adaptive rows trainable, the drafts learn while every real token's logits stay
    exactly the base model's (the "capacity only at adaptive positions" option)."""
    import copy

    from sdsat_lsp.corpus import stdlib_dir
    from sdsat_lsp.training.tinymodel import slot_token_names
    from sdsat_lsp.training.train import freeze_all_but_adaptive_rows

    base, tokenizer, adaptive_id = tiny_lm
    stream = tokenizer((stdlib_dir() / "textwrap.py").read_text())["input_ids"]
    model = copy.deepcopy(base)
    adaptive = [adaptive_id]
    assert slot_token_names(2) == ["<|sdsat_slot_1|>", "<|sdsat_slot_2|>"]
    params = freeze_all_but_adaptive_rows(model, adaptive)
    before_rows = model.get_input_embeddings().weight[adaptive].detach().clone()
    train_steps(model, stream, adaptive, steps=6, seq_len=64, batch_size=2, max_block=3, blocks_per_row=4, lr=1e-2,
                params=params, targets="greedy", slot_decay=0.8, soft_weight=0.5)
    x = torch.tensor([stream[200:264]])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)
    assert not torch.equal(model.get_input_embeddings().weight[adaptive], before_rows)  # the drafts did train
    for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        if "embed_tokens" not in name:
            assert torch.equal(p, q), name


def test_frozen_prefix_losses_equal_the_one_pass_losses_and_gradients(tiny_lm):
    """The cheap path of `--peft adaptive-rows` (real tokens once without autograd, then only the
    blocks through the cache) computes the same losses and the same gradient on the adaptive rows
    as the one pass over [real; blocks], with slot weights and soft targets on."""
    import copy

    from sdsat_lsp.training.train import freeze_all_but_adaptive_rows, frozen_prefix_losses, sdsat_losses

    base, tokenizer, adaptive_id = tiny_lm
    model = copy.deepcopy(base).float()
    freeze_all_but_adaptive_rows(model, [adaptive_id])
    from sdsat_lsp.corpus import stdlib_dir

    stream = tokenizer((stdlib_dir() / "textwrap.py").read_text())["input_ids"]
    tokens = torch.tensor([stream[100:164], stream[400:464]])
    batch = make_sdsat_batch(tokens, [adaptive_id], 4, 5, random.Random(3))
    grads, losses = [], []
    for fn in (sdsat_losses, frozen_prefix_losses):
        model.zero_grad(set_to_none=True)
        real, adaptive = fn(model, batch, slot_decay=0.8, soft_weight=0.5)
        adaptive.backward()
        losses.append((real.item(), adaptive.item()))
        grads.append(model.get_input_embeddings().weight.grad[adaptive_id].clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
