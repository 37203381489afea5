"""`sdsat-lsp stress` in the default test run: about 1,000 requests of valid and hostile traffic
against the server over stdio, on the tiny random model (fast), and nothing may be lost."""

from __future__ import annotations

import json

from sdsat_lsp.cli import main


def test_stress_1000_requests_nothing_lost(tiny_model_dir, tmp_path):
    out = tmp_path / "stress.json"
    code = main(["stress", "--requests", "1000", "--json", str(out), "--model", str(tiny_model_dir), "--seed", "1",
                 "--kv-budget-mb", "4", "--progress-s", "30"])
    result = json.loads(out.read_text())
    assert result["unanswered"] == 0 and result["crashes"] == 0 and result["hangs"] == 0, result["crash_details"]
    assert result["max_kv_mb"] <= result["kv_budget_mb"] and result["kv_samples"] > 0
    assert result["max_stats_poll_ms"] > 0  # reported (its bound is a figure for quiet machines)
    assert result["identical_after"] is True, result.get("identical_mismatches")
    assert result["requests"] >= 1000 and result["answered"] == result["requests"]
    # The storm did send the hostile part, and the server told the client what was wrong.
    assert result["malformed_frames"] > 0 and result["errors_by_code"].get("-32602", 0) > 0
    assert "-32603" not in result["errors_by_code"], result["error_samples"]  # an internal error is a bug
    assert result["unexpected_responses"] == 0 and result["stdout_garbage"] == 0
    assert result["exit_code"] == 0 and not result["orphans"]
    # Issue 17's figures: the hostile cases ran, the loop stayed responsive, every wait was bounded.
    assert result["by_kind"].get("invalid-nested-jsonrpc", 0) > 0 and result["null_id_errors"].get("-32600", 0) > 0
    assert 0 < result["max_request_ms"] < 60_000
    assert 0 <= result["max_event_loop_block_ms"] < 5_000
    assert code == 0
