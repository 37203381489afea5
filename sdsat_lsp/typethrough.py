"""Typing through a suggestion costs no model pass.

After a completion the document keeps a `Continuation`: the ids the model was given and the tokens
greedy decoding produced after them (the same ids the KV cache keeps). When the user types the
first characters of the suggestion, the next request's model prompt is often those ids plus the
first j generated tokens. Greedy decoding from there would produce the rest of those tokens again,
so the answer is known without a pass, as long as three things hold:

- the next token: after the first generated token no token was constrained, so token j was the
  argmax over the whole vocabulary; it is the new request's choice too when its healing constraint
  (a prompt that ends inside a token) admits it. For j = 0 it was the argmax over the old
  constraint's set; the new set must then lie inside that one (typing more of a word narrows it).
- where the new request would stop: the engine's own stopper, with the new request's rules
  (another cursor context, another "text after the cursor"), is fed the remaining tokens one by
  one. It must stop inside them, or right after them when the old decode ended at EOS (the next
  token is then EOS again). Anything else (a deadline, the token limit, a cancel, a stop the new
  rules do not make) leaves the next token unknown: decode normally.
- the same model and the same settings (time limits aside, which only cut), and greedy decoding.

A remainder that the rules turn into no completion at all is decoded normally too.

Nothing here runs the model; the prompt is built (tokenizer work) once, and reused by the normal
path when the check fails.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .completion import Prepared, Result, complete, prepare, stats_of
from .kvcache import common_prefix_len
from .settings import Settings


@dataclass
class Continuation:
    """What greedy decoding produced after a document's last model prompt."""

    prompt_ids: list[int]  # the ids the model was given (healed)
    first_token_ids: frozenset[int] | None  # the first new token was chosen among these (healing)
    tokens: list[int]  # the tokens it produced (EOS not included)
    finish_reason: str  # why it ended: only "eos" says what the next token is
    settings: Settings  # the request's settings, time limits zeroed (see `_same_output`)
    loaded: object  # the model it came from (identity)
    completion_id: int  # the suggestion this continuation showed (acceptance.py counts it once)
    prefetched: int = 0  # tokens of `tokens` decoded by the prefetch, after the answer

    @classmethod
    def of(cls, result: Result, s: Settings, loaded, completion_id: int) -> Continuation:
        mp, gen = result.model_prompt, result.generation
        allowed = frozenset(mp.first_token_ids) if mp.first_token_ids is not None else None
        return cls(list(mp.ids), allowed, list(gen.tokens), gen.finish_reason, _output_settings(s), loaded,
                   completion_id)

    def extend(self, tokens: Sequence[int], finish_reason: str) -> None:
        """More tokens decoded after these (the prefetch, prefetch.py)."""
        self.tokens = self.tokens + list(tokens)
        self.finish_reason = finish_reason
        self.prefetched += len(tokens)


def _output_settings(s: Settings) -> Settings:
    # The time limits only cut a decode short, and a cut one is never typed through beyond its end.
    return dataclasses.replace(s, time_budget_ms=0, deadline_ms=0)


def complete_typing(loaded, s: Settings, text: str, offset: int, record: Continuation | None, seq: int, *,
                    keep: str | None, kv, uri: str, **options) -> tuple[Result, Continuation | None]:
    """The completion at `offset`, typed through `record` when that is exact, else decoded
    (`completion.complete` with `options`); and the document's continuation afterwards."""
    started = time.perf_counter()
    prepared = prepare(loaded, s, text, offset, keep)
    answered = type_through(loaded, s, prepared, record, kv.cached_ids(uri) if kv is not None else [])
    if answered is not None:
        answered.stats["typeThroughMs"] = round((time.perf_counter() - started) * 1e3, 2)
        return answered, record
    result = complete(loaded, s, text, offset, keep=keep, kv=kv, uri=uri, prepared=prepared, **options)
    result.stats.update(typedThrough=False, completionId=seq)
    return result, Continuation.of(result, s, loaded, seq)


def type_through(loaded, s: Settings, p: Prepared, record: Continuation | None,
                 cached_ids: Sequence[int] = ()) -> Result | None:
    """The result greedy decoding would give for `p`, read off `record`; None when it is not known
    without a pass. `cached_ids`: what the document's KV cache holds (for the stats only)."""
    if record is None or record.loaded is not loaded or s.temperature > 0 or record.settings != _output_settings(s):
        return None
    ids, old = p.model_prompt.ids, record.prompt_ids
    known = old + record.tokens
    j = len(ids) - len(old)  # generated tokens the new prompt ends with
    if not 0 <= j < len(record.tokens) or known[:len(ids)] != ids:
        return None
    if not _same_choice(record.tokens[j], record.first_token_ids if j == 0 else None, p.model_prompt.first_token_ids):
        return None
    tokens, reason = _stop_within(loaded, s, p, record.tokens[j:], record.finish_reason)
    if reason is None:
        return None
    completion = p.rules.finish(p.model_prompt.decode(tokens))
    if completion is None:
        return None  # nothing left to show: a normal decode finds the next suggestion
    from .engine import DecodeStats, Generation  # torch: imported on the worker by then

    reused = common_prefix_len(cached_ids, ids)
    gen = Generation(tokens, reason, DecodeStats(reused_tokens=reused, new_tokens=len(tokens)), list(ids) + tokens)
    stats = stats_of(gen, p.model_prompt, p.prompt, len(cached_ids), p.mode, p.k)
    stats.update(typedThrough=True, completionId=record.completion_id)
    return Result(completion, stats, p.prompt, p.model_prompt, gen)


def _same_choice(token: int, old_allowed: frozenset[int] | None, new_allowed: Sequence[int] | None) -> bool:
    """Whether `token`, the argmax over `old_allowed` (None: every token), is the argmax over
    `new_allowed` too: it is when it is in the new set and the new set lies inside the old one."""
    if new_allowed is None:
        return old_allowed is None
    new = frozenset(new_allowed)
    return token in new and (old_allowed is None or new <= old_allowed)


def _stop_within(loaded, s: Settings, p: Prepared, tokens: list[int], old_reason: str) -> tuple[list[int], str | None]:
    """Feed `tokens` to the engine's stopper for the new request: (the tokens it keeps, its finish
    reason), or (..., None) when it would go on past what is known."""
    from .engine import _stopper, context_length  # the engine's own stopping: the same stop, token by token
    from .stopping import Stopping

    mp, rules = p.model_prompt, p.rules
    stopping = Stopping(max_new_tokens=s.max_tokens, decode=mp.decode,
                        should_stop=lambda generated: rules.should_stop(mp.decode(generated)))
    stopper = _stopper(loaded.model, stopping, context_length(loaded.model) - len(mp.ids))
    if not stopper.push_all(tokens) and old_reason == "eos" and stopper.eos_ids:
        stopper.push(next(iter(stopper.eos_ids)))  # the old decode's next token was EOS: so is this one's
    return stopper.tokens, stopper.finish_reason
