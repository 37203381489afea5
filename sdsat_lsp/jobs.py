"""The worker's side of a completion request (`SdsatServer.run_job`, on the inference thread):
type through the document's last suggestion when that is exact, else decode (typethrough.py,
completion.py); record the request's figures for `sdsat/stats`; then queue the prefetch
(prefetch.py), which the next request, edit or settings change preempts."""

from __future__ import annotations

import logging
import time
from typing import Any

from . import prefetch
from .prompt import Completion
from .session import Job, Outcome
from .typethrough import complete_typing

log = logging.getLogger(__name__)


def run_job(server, job: Job) -> Outcome:
    """`job`'s outcome; never raises."""
    stats: dict[str, Any] = {"seq": job.seq, "requestId": job.request_id, "uri": job.uri,
                             "queueMs": round((time.perf_counter() - job.created) * 1e3, 2)}
    try:
        completion = _answer(server, job, stats)
    except Exception as exc:
        log.exception("[req %s] completion failed", job.request_id)
        stats.update(finishReason="error", error=f"{type(exc).__name__}: {exc}")
        completion = None
    outcome = record(server, job, stats, completion)
    prefetch_soon(server, job)
    return outcome


def record(server, job: Job, stats: dict, completion: Completion | None) -> Outcome:
    """The request's figures into `sdsat/stats` and the log (also backends/remote.py's)."""
    stats["totalMs"] = round((time.perf_counter() - job.created) * 1e3, 2)
    stats["items"] = int(completion is not None)
    with server.recent_lock:
        server.recent.append(stats)
    log.info("[req %s] %s", job.request_id, " ".join(f"{k}={v}" for k, v in stats.items() if k not in ("uri", "requestId")))
    return Outcome(completion, stats)


def _answer(server, job: Job, stats: dict) -> Completion | None:
    loaded, kv, s = server.loaded, server.kv, job.settings
    if job.cancel.is_set() or loaded is None or kv is None:
        stats["finishReason"] = "cancelled" if job.cancel.is_set() else "not-ready"
        return None
    hard_deadline = job.created + s.deadline_ms / 1e3 if s.deadline_ms else None
    if hard_deadline is not None and time.perf_counter() > hard_deadline:
        # It waited in the queue past its deadline (a loaded machine, a burst over many
        # documents): even one pass would only make the answer later, and every job behind it too.
        stats.update(finishReason="deadline", forwardPasses=0)
        return None
    result, job.doc.continuation = complete_typing(
        loaded, s, job.text, job.offset, job.doc.continuation, job.seq, keep=job.doc.window_head, kv=kv,
        uri=job.uri, draft_store=server.drafts.store, cancel=job.cancel.is_set,
        deadline=job.created + s.time_budget_ms / 1e3 if s.time_budget_ms else None,
        hard_deadline=hard_deadline)
    job.doc.window_head = result.prompt.window_head
    if job.doc.closed:  # closed while this ran: its cache, stored just now, goes too
        kv.drop(job.uri)
    stats.update(result.stats)
    return result.completion


def prefetch_soon(server, job: Job) -> None:
    """Queue a prefetch after `job`'s answer. It runs after the answer is handed back, once nothing
    came since `job` for PREFETCH_IDLE_MS (`server.activity`, bumped on the event loop: requests,
    edits, closes, settings), and stops at the next pass once something does."""
    if job.doc.closed or not prefetch.wanted(job.settings, job.doc.continuation, server.loaded, server.kv, job.uri):
        return

    def run() -> None:
        kv, activity = server.kv, server.activity
        try:
            if not activity.idle_since(job.activity, prefetch.PREFETCH_IDLE_MS / 1e3) or job.doc.closed or kv is None:
                return
            started = time.perf_counter()
            figures = prefetch.prefetch(server.loaded, job.settings, kv, job.uri, job.doc.continuation,
                                        lambda: activity.count != job.activity)
            server.prefetched.add(figures, (time.perf_counter() - started) * 1e3)
            if job.doc.closed:  # closed while this ran: its cache, stored just now, goes too
                kv.drop(job.uri)
        finally:
            server.prefetched.pending -= 1

    server.prefetched.pending += 1  # on the worker, as the decrement: no race
    try:
        server.worker.submit(run)
    except RuntimeError:  # shut down
        server.prefetched.pending -= 1
