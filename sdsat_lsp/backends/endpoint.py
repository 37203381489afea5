"""The HTTP side of a remote backend: an OpenAI-compatible completions endpoint (vLLM's, or any
other), over httpx2 (installed with huggingface_hub, listed in pyproject.toml). Every failure
becomes an `EndpointError` whose message says what went wrong in words a user can act on: the
server shows it as its `error` state (remote.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2

CONNECT_TIMEOUT_S = 2.0
# Between two chunks of a stream and for a whole probe. A healthy endpoint answers in ms; a
# completion's own deadline (deadlineMs, remote.py) ends it sooner when one is set.
READ_TIMEOUT_S = 10.0
# Tokenized by the endpoint and by the server at start: any difference means the two do not use
# the same tokenizer, and token-id prompts would mean something else to the endpoint.
PROBE_TEXT = 'def f(x):\n    return "h\u00e9llo \u2713" + x  # 42\n\tpass\r\n'
MAX_QUOTED_CHARS = 200


class EndpointError(Exception):
    """The endpoint is down, too slow, refused a request or answered something that is not what
    the protocol says."""


def base_url(url: str) -> str:
    """The URL the paths are appended to: users give it with or without /v1."""
    url = url.strip().rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def new_client() -> httpx2.AsyncClient:
    # trust_env stays on: a proxy the user configured (and NO_PROXY) applies as for any client.
    return httpx2.AsyncClient(timeout=httpx2.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))


@dataclass
class Served:
    model: str  # the name requests carry
    max_model_len: int | None  # vLLM lists it with the model; None elsewhere
    tokenizer_checked: bool  # False: the endpoint has no /tokenize (a plain OpenAI-compatible one)


async def probe(client: httpx2.AsyncClient, url: str, wanted: str, probe_ids: Sequence[int],
                require_tokenize: bool) -> Served:
    """The model the endpoint serves (`wanted`, or when that is "" the only one it lists), and whether it
    tokenizes PROBE_TEXT into `probe_ids` (the server's tokenizer's ids for it)."""
    listing = await _json(client, "GET", f"{url}/v1/models")
    try:
        entries = {str(m["id"]): m for m in listing["data"]}
    except (KeyError, TypeError) as exc:
        raise EndpointError(f"/v1/models answered no model list: {_quote(listing)}") from exc
    if not entries:
        raise EndpointError("the endpoint serves no model")
    names = ", ".join(sorted(entries))
    if wanted and wanted not in entries:
        raise EndpointError(f"the endpoint does not serve the model {wanted!r}; it serves {names} (backendModel)")
    if not wanted and len(entries) > 1:
        raise EndpointError(f"the endpoint serves several models ({names}): choose one with backendModel")
    name = wanted or next(iter(entries))
    max_len = entries[name].get("max_model_len") if isinstance(entries[name], dict) else None
    checked = await _check_tokenizer(client, url, name, probe_ids, require_tokenize)
    return Served(name, max_len if isinstance(max_len, int) and max_len > 0 else None, checked)


async def _check_tokenizer(client, url: str, name: str, probe_ids: Sequence[int], required: bool) -> bool:
    try:
        response = await client.post(f"{url}/tokenize", json={"model": name, "prompt": PROBE_TEXT,
                                                              "add_special_tokens": False})
    except httpx2.HTTPError as exc:
        raise _transport_error(url, exc) from exc
    if response.status_code == 404 and not required:
        return False
    _raise_for_status(response, response.text)
    body = _body(response, f"{url}/tokenize")
    theirs = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(theirs, list):
        raise EndpointError(f"/tokenize answered no tokens: {_quote(response.text)}")
    if list(theirs) != list(probe_ids):
        at = next((i for i, (a, b) in enumerate(zip(theirs, probe_ids)) if a != b), min(len(theirs), len(probe_ids)))
        raise EndpointError(
            f"tokenizer mismatch: the endpoint's model {name!r} tokenizes a probe text differently from the server's "
            f"model (from token {at}: {theirs[at:at + 4]} against {list(probe_ids[at:at + 4])}); "
            "point `model` at the folder the endpoint serves")
    return True


@dataclass
class Chunk:
    token_ids: list[int] | None  # vLLM's return_token_ids; None from endpoints without it
    text: str
    finish_reason: str | None
    usage: dict | None  # the last chunk's, with stream_options.include_usage


async def stream(client: httpx2.AsyncClient, url: str, body: dict,
                 check_token: Callable[[int], bool]) -> AsyncIterator[Chunk]:
    """POST /v1/completions with `body` (stream on); the chunks as they come. Leaving the iteration
    early (aclose) closes the connection: that is how vLLM learns to abort the request."""
    done = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code >= 400:
                _raise_for_status(response, (await response.aread()).decode("utf-8", "replace"))
            async for line in response.aiter_lines():
                chunk = parse_event(line, check_token)
                if chunk is _DONE:
                    done = True
                    break
                if chunk is not None:
                    yield chunk
    except httpx2.HTTPError as exc:
        raise _transport_error(url, exc) from exc
    if not done:
        raise EndpointError("the completion stream ended without its end marker ([DONE])")


_DONE: Any = object()


def parse_event(line: str, check_token: Callable[[int], bool]) -> Chunk | None:
    """One line of the server-sent event stream: a Chunk, _DONE, or None for lines that carry no
    data (blank lines, comments, event names)."""
    line = line.strip()
    if not line or line.startswith(":") or line.split(":", 1)[0] in ("event", "id", "retry"):
        return None
    if not line.startswith("data:"):
        raise EndpointError(f"not a server-sent event stream: {_quote(line)}")
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise EndpointError(f"a stream event that is not JSON: {_quote(data)}") from exc
    if not isinstance(event, dict):
        raise EndpointError(f"a stream event that is not an object: {_quote(data)}")
    if event.get("error"):
        raise EndpointError(f"the endpoint failed mid-stream: {_message(event) or _quote(data)}")
    choices = event.get("choices")
    if not isinstance(choices, list) or (not choices and not event.get("usage")):
        raise EndpointError(f"a stream event without choices: {_quote(data)}")
    usage = event.get("usage") if isinstance(event.get("usage"), dict) else None
    if not choices:
        return Chunk(None, "", None, usage)
    choice = choices[0] if isinstance(choices[0], dict) else {}
    ids, text = choice.get("token_ids"), choice.get("text", "")
    if ids is not None and not (isinstance(ids, list) and all(type(t) is int and check_token(t) for t in ids)):
        raise EndpointError(f"token ids that are not the model's: {_quote(ids)}")
    if not isinstance(text, str):
        raise EndpointError(f"a stream event whose text is not a string: {_quote(data)}")
    return Chunk(ids, text, choice.get("finish_reason"), usage)


async def _json(client: httpx2.AsyncClient, method: str, url: str) -> Any:
    try:
        response = await client.request(method, url)
    except httpx2.HTTPError as exc:
        raise _transport_error(url, exc) from exc
    _raise_for_status(response, response.text)
    return _body(response, url)


def _body(response, url: str) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise EndpointError(f"{url} answered something that is not JSON: {_quote(response.text)}") from exc


def _raise_for_status(response, text: str) -> None:
    if response.status_code < 400:
        return
    try:
        message = _message(json.loads(text))
    except ValueError:
        message = None
    raise EndpointError(f"HTTP {response.status_code} from {response.request.url.path}: {message or _quote(text)}")


def _message(body: Any) -> str | None:
    """The error message of an OpenAI-style ({"error": {"message"}}) or FastAPI ({"detail"}) body."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:MAX_QUOTED_CHARS]
    detail = body.get("detail") or (error if isinstance(error, str) else None)
    return _quote(detail) if detail else None


def _transport_error(url: str, exc: Exception) -> EndpointError:
    if isinstance(exc, httpx2.TimeoutException):
        return EndpointError(f"no answer from {url} within {READ_TIMEOUT_S:g} s ({type(exc).__name__})")
    if isinstance(exc, httpx2.ConnectError):
        return EndpointError(f"cannot connect to {url}: {exc or type(exc).__name__}")
    return EndpointError(f"the connection to {url} failed: {type(exc).__name__}: {exc}")


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return repr(text[:MAX_QUOTED_CHARS] + ("..." if len(text) > MAX_QUOTED_CHARS else ""))
