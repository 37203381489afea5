"""The remote backend (sdsat_lsp/backends/): the server builds the prompt, an OpenAI-compatible
endpoint decodes it. Against tests/fake_endpoint.py, a scripted endpoint on 127.0.0.1:

- the streamed token ids become the completion the local pipeline makes of the same tokens, with
  the healed first token asked for alone (allowed_token_ids) and the rest after it;
- the completion rules, a newer request, $/cancelRequest and didClose abort the HTTP request;
- the endpoint down, failing, answering garbage or too slow gives the `error` state with the
  reason and an empty answer, and the server recovers by itself when the endpoint is back;
- a wrong model name and a tokenizer that is not the server's are caught at start.
The real vLLM is tests/e2e/test_vllm.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from types import SimpleNamespace

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcException

from fake_endpoint import FakeEndpoint  # tests/fake_endpoint.py
from lsp_client import BASE_OPTIONS, Session, capabilities
from sdsat_lsp.completion import heal_prompt, request_prompt
from sdsat_lsp.modelcard import read_model_card
from sdsat_lsp.prompt import Rules
from sdsat_lsp.settings import Settings, parse_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

DOC = "import os\n\n\ndef size(path):\n    return os.path.getsize(path)\n\n\ndef double(x):\n    return x"
LINE, COLUMN = 8, 12  # the end of the last line, inside a token the healed first one extends ("x")
OFFSET = len(DOC)


@pytest.fixture(scope="module")
def fake(tiny_lm):
    endpoint = FakeEndpoint(tiny_lm[1]).start()
    yield endpoint
    endpoint.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def remote(fake, tiny_model_dir):
    options = {"model": str(tiny_model_dir), **BASE_OPTIONS, "backend": "vllm", "backendUrl": fake.url}
    session = await Session.start(options, capabilities())
    yield session
    await session.stop()


@pytest.fixture(scope="module")
def local_prompt(tiny_lm, tiny_model_dir):
    """(model prompt, rules) as the server builds them for `text` at `offset` with BASE_OPTIONS."""
    model, tokenizer, _ = tiny_lm
    card = dataclasses.replace(read_model_card(tiny_model_dir), adaptive_ids=[])
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, card=card)

    def build(text: str, offset: int, **options):
        settings = dataclasses.replace(parse_settings(BASE_OPTIONS, Settings())[0], **options)
        prompt, _, _ = request_prompt(loaded, settings, text, offset)
        return heal_prompt(tokenizer, prompt.ids, settings.token_healing), Rules(prompt.context)

    return build


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def status_after(session: Session, since: int, state: str, timeout: float = 20) -> dict:
    """The first `state` status the server sent after the first `since` statuses."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        for status in session.statuses[since:]:
            if status["state"] == state:
                return status
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {state!r} status within {timeout} s: {session.statuses[since:]}")


def reset(fake: FakeEndpoint, tokenizer) -> None:
    fake.mode, fake.delay_s, fake.tokenize_shift = "ok", 0.0, 0
    fake.first = ids(tokenizer, DOC)[-1]  # the healed first token: the one the cursor is in ("x")
    fake.script = ids(tokenizer, " * 2\n\n\ndef triple(x):\n    return x * 3\n")


async def test_streamed_ids_become_the_local_pipelines_completion(remote, fake, tiny_lm, local_prompt):
    tokenizer = tiny_lm[1]
    reset(fake, tokenizer)
    mp, rules = local_prompt(DOC, OFFSET)
    assert mp.healed, "the prompt ends inside a token: the first token is healed"
    first = fake.first
    assert first in mp.first_token_ids
    uri = "file:///remote-basic.py"
    remote.open(uri, DOC)
    before = len(fake.requests)
    result = await remote.inline(uri, LINE, COLUMN)
    remote.close(uri)
    heal_request, rest_request = fake.requests[before:]
    assert heal_request["prompt"] == mp.ids and heal_request["max_tokens"] == 1
    assert heal_request["allowed_token_ids"] == mp.first_token_ids
    assert heal_request["return_token_ids"] and heal_request["stream"] and heal_request["temperature"] == 0
    assert rest_request["prompt"] == mp.ids + [first] and "allowed_token_ids" not in rest_request
    expected = rules.finish(mp.decode([first] + fake.script))
    assert expected is not None and expected.text.strip()
    assert [item.insert_text for item in result.items] == [expected.text]
    stats = await remote.last_request(uri)
    assert stats["backend"] == "vllm" and stats["healed"] and stats["requests"] == 2
    assert stats["finishReason"] == "stop" and stats["promptTokens"] == len(mp.ids)


async def test_the_stop_rule_aborts_the_http_request(remote, fake, tiny_lm):
    tokenizer = tiny_lm[1]
    reset(fake, tokenizer)
    fake.script = ids(tokenizer, " * 2\n" + " y" * 400)  # the completion is one line: it ends at "\n"
    fake.delay_s = 0.005
    uri = "file:///remote-stop.py"
    remote.open(uri, DOC)
    remote.configure({"maxTokens": 400})
    try:
        n = len(fake.streams)
        result = await remote.inline(uri, LINE, COLUMN)
        streams = fake.wait_streams(n + 2)[n:]
        assert [item.insert_text for item in result.items] == [" * 2"]
        assert streams[-1]["aborted"] and streams[-1]["sent"] < 50, streams
    finally:
        remote.configure({"maxTokens": BASE_OPTIONS["maxTokens"]})
        remote.close(uri)


async def _long_request(remote, fake, tokenizer, uri: str, msg_id: str | None = None):
    reset(fake, tokenizer)
    fake.script = ids(tokenizer, " y" * 600)  # no newline: only max_tokens would end it (6 s)
    fake.delay_s = 0.01
    remote.open(uri, DOC)
    remote.configure({"maxTokens": 600})
    params = remote.inline_params(uri, LINE, COLUMN)
    if msg_id is None:
        future = remote.client.text_document_inline_completion_async(params)
    else:
        future = remote.client.protocol.send_request_async(types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id)
    n = len(fake.streams)
    future = asyncio.ensure_future(future)
    started = time.perf_counter()
    # Until the long stream (after the healed token's) is under way.
    while not (len(fake.streams) > n + 1 and fake.streams[n + 1]["sent"] > 5):
        assert time.perf_counter() - started < 20, fake.streams[n:]
        await asyncio.sleep(0.02)
    return future


async def test_a_newer_request_aborts_the_older_one(remote, fake, tiny_lm):
    uri = "file:///remote-newer.py"
    n = len(fake.streams)
    older = await _long_request(remote, fake, tiny_lm[1], uri)
    try:
        remote.configure({"maxTokens": 8})
        newer = remote.client.text_document_inline_completion_async(remote.inline_params(uri, LINE, COLUMN))
        old_result, new_result = await asyncio.wait_for(asyncio.gather(older, newer), 30)
        assert not old_result.items and new_result.items
        _assert_aborted(fake.wait_streams(n + 4)[n + 1])  # [n]: the older one's healed token
        old_stats, new_stats = (await remote.stats(uri=uri))["requests"][-2:]
        assert old_stats["finishReason"] == "cancelled" and new_stats["finishReason"] == "length"
    finally:
        remote.configure({"maxTokens": BASE_OPTIONS["maxTokens"]})
        remote.close(uri)


def _assert_aborted(stream: dict) -> None:
    """The endpoint saw the client close this stream long before its 300+ tokens were sent."""
    assert stream["aborted"] and stream["sent"] < 300, stream


async def test_cancel_request_aborts_the_http_request(remote, fake, tiny_lm):
    uri = "file:///remote-cancel.py"
    n = len(fake.streams)
    future = await _long_request(remote, fake, tiny_lm[1], uri, msg_id="cancel-remote")
    try:
        remote.client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="cancel-remote"))
        with pytest.raises(JsonRpcException) as info:
            await asyncio.wait_for(future, 30)
        assert info.value.code == -32800  # RequestCancelled
        _assert_aborted(fake.wait_streams(n + 2)[n + 1])
        assert (await remote.last_request(uri))["finishReason"] == "cancelled"
    finally:
        remote.configure({"maxTokens": BASE_OPTIONS["maxTokens"]})
        remote.close(uri)


async def test_did_close_aborts_the_http_request(remote, fake, tiny_lm):
    uri = "file:///remote-close.py"
    n = len(fake.streams)
    future = await _long_request(remote, fake, tiny_lm[1], uri)
    try:
        remote.close(uri)
        assert not (await asyncio.wait_for(future, 30)).items
        _assert_aborted(fake.wait_streams(n + 2)[n + 1])
    finally:
        remote.configure({"maxTokens": BASE_OPTIONS["maxTokens"]})


@pytest.mark.parametrize("mode, reason", [
    ("http-error", "HTTP 500 from /v1/completions: fake engine failure"),
    ("garbage", "a stream event that is not JSON"),
    ("bad-ids", "token ids that are not the model's"),
    ("html", "not a server-sent event stream"),
    ("no-done", "the completion stream ended without its end marker"),
    ("text-only", "the endpoint streams text without token ids"),
])
async def test_a_failing_endpoint_gives_the_error_state_then_recovers(remote, fake, tiny_lm, mode, reason):
    reset(fake, tiny_lm[1])
    fake.mode = mode
    uri = f"file:///remote-{mode}.py"
    remote.open(uri, DOC)
    try:
        since = len(remote.statuses)
        assert not (await remote.inline(uri, LINE, COLUMN)).items
        error = await status_after(remote, since, "error")
        assert reason in error["message"] and fake.url in error["message"], error
        assert (await remote.last_request(uri))["finishReason"] == "backend-error"
        fake.mode = "ok"
        await status_after(remote, since, "ready")  # the probe after 0.5 s finds it answering
        assert (await remote.inline(uri, LINE, COLUMN)).items
    finally:
        reset(fake, tiny_lm[1])
        remote.close(uri)


async def test_the_endpoint_down_then_back(remote, fake, tiny_lm):
    reset(fake, tiny_lm[1])
    uri = "file:///remote-down.py"
    remote.open(uri, DOC)
    port = fake.port
    fake.stop()
    try:
        since = len(remote.statuses)
        assert not (await remote.inline(uri, LINE, COLUMN)).items
        error = await status_after(remote, since, "error")
        assert "cannot connect to" in error["message"], error
        # While it is down, requests are answered empty at once, and the probes back off.
        started = time.perf_counter()
        assert not (await remote.inline(uri, LINE, COLUMN)).items
        assert time.perf_counter() - started < 2
        await asyncio.sleep(2.0)
        retries = [s["message"] for s in remote.statuses[since:] if "retrying in" in s["message"]]
        assert any("retrying in 1 s" in m for m in retries) and any("retrying in 2 s" in m for m in retries), retries
        fake.start(port)
        ready = await status_after(remote, since, "ready", timeout=30)
        assert "reconnected after" in ready["message"]
        assert (await remote.inline(uri, LINE, COLUMN)).items
    finally:
        if fake.httpd is None:
            fake.start(port)
        remote.close(uri)


async def test_a_slow_endpoint_is_an_error_and_never_blocks_the_server(remote, fake, tiny_lm):
    reset(fake, tiny_lm[1])
    fake.delay_s = 3.0  # before every token: nothing by the 1 s deadline
    uri = "file:///remote-slow.py"
    remote.open(uri, DOC)
    remote.configure({"deadlineMs": 1000})
    try:
        since = len(remote.statuses)
        future = asyncio.ensure_future(remote.inline(uri, LINE, COLUMN))
        await asyncio.sleep(0.1)
        await remote.stats()
        assert not future.done(), "sdsat/stats is answered while the completion waits on the endpoint"
        assert not (await future).items
        error = await status_after(remote, since, "error")
        assert "no token within the 1000 ms deadline" in error["message"], error
    finally:
        remote.configure({"deadlineMs": BASE_OPTIONS["deadlineMs"]})
        reset(fake, tiny_lm[1])
        await status_after(remote, since, "ready")
        remote.close(uri)


@pytest.mark.parametrize("change, reason", [
    ({"backendModel": "no-such-model"}, "does not serve the model 'no-such-model'; it serves fake-model"),
    ({"backendModel": "fake-model", "shift": 1}, "tokenizer mismatch"),
    ({"backendUrl": ""}, "backend vllm needs backendUrl"),
])
async def test_start_up_checks(remote, fake, tiny_lm, change, reason):
    reset(fake, tiny_lm[1])
    fake.tokenize_shift = change.pop("shift", 0)
    since = len(remote.statuses)
    remote.configure(change)  # a backend setting: the server reloads and checks the endpoint again
    try:
        error = await status_after(remote, since, "error")
        assert reason in error["message"], error
    finally:
        reset(fake, tiny_lm[1])
        since = len(remote.statuses)
        remote.configure({"backendModel": "", "backendUrl": fake.url})
        await status_after(remote, since, "ready")


async def test_a_plain_openai_endpoint_streams_text(remote, fake, tiny_lm, local_prompt):
    reset(fake, tiny_lm[1])
    fake.mode = "text-only"
    since = len(remote.statuses)
    remote.configure({"backend": "openai"})
    uri = "file:///remote-openai.py"
    try:
        await status_after(remote, since, "ready")
        mp, rules = local_prompt(DOC, OFFSET, token_healing=False)  # no token healing on a plain endpoint
        remote.open(uri, DOC)
        before = len(fake.requests)
        result = await remote.inline(uri, LINE, COLUMN)
        (request,) = fake.requests[before:]
        assert request["prompt"] == mp.ids and "return_token_ids" not in request
        expected = rules.finish("".join(tiny_lm[1].decode([t]) for t in fake.script))
        assert [item.insert_text for item in result.items] == [expected.text]
        assert (await remote.last_request(uri))["backend"] == "openai"
    finally:
        reset(fake, tiny_lm[1])
        since = len(remote.statuses)
        remote.configure({"backend": "vllm"})
        await status_after(remote, since, "ready")
        remote.close(uri)


async def test_backend_settings_are_checked():  # async: the module runs on one loop
    settings, problems = parse_settings({"backend": "tgi", "backendUrl": "http://h:1"}, Settings())
    assert settings.backend == "local" and settings.backend_url == "http://h:1"
    assert problems == ["backend: expected one of local, vllm, openai, got 'tgi'; using 'local'"]
