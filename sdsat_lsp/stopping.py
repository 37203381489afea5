"""Stopping: one token at a time, so that SDSAT, which learns several tokens per pass, stops at
exactly the token where plain decoding would."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Stopping:
    """When generation ends (see `Stopper`). `eos_ids` None: the model config's EOS ids."""

    max_new_tokens: int = 64
    eos_ids: Sequence[int] | None = None
    stop_strings: Sequence[str] = ()
    decode: Callable[[list[int]], str] | None = None  # new tokens -> text (stop strings, the budget)
    should_stop: Callable[[list[int]], bool] | None = None
    deadline: float | None = None  # a time.perf_counter() value; see `Stopper`
    hard_deadline: float | None = None  # past this (perf_counter), generation ends after the pass


class Stopper:
    """Decides, token by token, when generation ends. EOS is not part of the output; a stop string
    ends generation at the token that completes it (that token is kept; callers trim the text).
    Past `deadline` (a time.perf_counter() value) generation ends at the next token holding a
    newline (llama.cpp's t_max_predict_ms rule), or at once when there is no `decode`. Past
    `hard_deadline` it ends at the next token whatever the text: the engine pushes a pass's tokens
    right after the pass, so no generation outlives that deadline by more than one pass."""

    def __init__(
        self,
        max_new_tokens: int,
        eos_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        decode: Callable[[list[int]], str] | None = None,
        should_stop: Callable[[list[int]], bool] | None = None,
        deadline: float | None = None,
        hard_deadline: float | None = None,
    ):
        if stop_strings and decode is None:
            raise ValueError("stop strings need a decode function")
        self.max_new_tokens = max_new_tokens
        self.eos_ids = set(eos_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.decode = decode
        self.should_stop = should_stop
        self.deadline, self.hard_deadline = deadline, hard_deadline
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def push(self, token: int) -> bool:
        """Take one generated token; True once generation is over."""
        assert self.finish_reason is None
        if token in self.eos_ids:
            self.finish_reason = "eos"
            return True
        self.tokens.append(token)
        if self.stop_strings and any(s in self.decode(self.tokens) for s in self.stop_strings):
            self.finish_reason = "stop"
        elif self.should_stop is not None and self.should_stop(self.tokens):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        elif self.hard_deadline is not None and time.perf_counter() > self.hard_deadline:
            self.finish_reason = "deadline"
        elif self.deadline is not None and time.perf_counter() > self.deadline and (
            self.decode is None or "\n" in self.decode([token])
        ):
            self.finish_reason = "budget"
        return self.finish_reason is not None

    def push_all(self, tokens: Sequence[int]) -> bool:
        return any(self.push(t) for t in tokens) if self.finish_reason is None else True
