"""Issue 17, resources and reach: what a client can make the server hold or walk is bounded, and what
it held is returned. Each case is driven over stdio as a client would send it, except the race
between the worker and the stats request, which only threads in one process can time."""

from __future__ import annotations

import sys
import threading


def test_stats_never_iterate_the_requests_while_the_worker_appends():
    """`sdsat/stats` listed the recent requests by iterating the deque on the event loop while the
    worker appended to it: "deque mutated during iteration" (5 of 3,000 stats requests failed so
    here, with a worker finishing jobs as fast as it can)."""
    from sdsat_lsp.server import build_server
    from sdsat_lsp.session import DocumentState, Job
    from sdsat_lsp.settings import Settings

    server = build_server()
    stop = threading.Event()

    def worker():  # the worker's own path: run_job records each job's stats (here: not ready)
        seq = 0
        while not stop.is_set():
            seq += 1
            server.run_job(Job(seq, seq, "file:///a.py", "", 0, Settings(), DocumentState()))

    thread = threading.Thread(target=worker)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows in seconds
    thread.start()
    try:
        for _ in range(3000):
            report = server.stats_report({"last": 256, "uri": "file:///a.py"})
            assert len(report["requests"]) <= 256
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert server.stats_report({"last": 5})["requests"][-1]["finishReason"] == "not-ready"
