"""The worker's side of a completion request (`SdsatServer.run_job`, on the inference thread):
type through the document's last suggestion when that is exact, else decode (typethrough.py,
completion.py); record the request's figures for `sdsat/stats`."""

from __future__ import annotations

import logging
import time
from typing import Any

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
    result, job.doc.continuation = complete_typing(
        loaded, s, job.text, job.offset, job.doc.continuation, job.seq, keep=job.doc.window_head, kv=kv,
        uri=job.uri, draft_store=server.drafts.store, cancel=job.cancel.is_set,
        deadline=job.created + s.time_budget_ms / 1e3 if s.time_budget_ms else None,
        hard_deadline=job.created + s.deadline_ms / 1e3 if s.deadline_ms else None)
    job.doc.window_head = result.prompt.window_head
    if job.doc.closed:  # closed while this ran: its cache, stored just now, goes too
        kv.drop(job.uri)
    stats.update(result.stats)
    return result.completion

