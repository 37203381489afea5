"""A small OpenAI-compatible completions endpoint (vLLM's dialect) on 127.0.0.1, in a thread of the
test process, scripted by the test: what a completion streams, how fast, and how it fails. It
records every completion request and, per stream, how many tokens it sent and whether the client
went away before the end (the server aborting the request)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# How a completion request is answered: "ok"; "http-error" (HTTP 500 with an OpenAI-style error);
# "garbage" (a data line that is not JSON); "bad-ids" (token ids outside any vocabulary); "html"
# (200 with a web page); "no-done" (the stream ends without [DONE]); "text-only" (no token ids).
MODES = ("ok", "http-error", "garbage", "bad-ids", "html", "no-done", "text-only")


class FakeEndpoint:
    def __init__(self, tokenizer, model: str = "fake-model"):
        self.tokenizer = tokenizer
        self.model = model
        self.script: list[int] = []  # the tokens a completion streams (max_tokens of them)
        self.first: int | None = None  # the answer to a request limited to allowed_token_ids, if allowed
        self.delay_s = 0.0  # before each token
        self.mode = "ok"
        self.tokenize_shift = 0  # added to /tokenize's ids: a tokenizer that is not the server's
        self.requests: list[dict] = []  # completion request bodies, in order
        self.streams: list[dict] = []  # per completion request: {"sent": tokens, "aborted": bool}
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> FakeEndpoint:
        fake = self

        class Handler(_Handler):
            endpoint = fake

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: the port refuses connections until `start(port)` again."""
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def wait_streams(self, n: int, timeout: float = 10.0) -> list[dict]:
        """The streams once `n` of them have ended (sent all, or seen the client go)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                ended = [s for s in self.streams if s["ended"]]
                if len(ended) >= n:
                    return list(self.streams)
            time.sleep(0.02)
        raise AssertionError(f"{n} streams did not end within {timeout} s: {self.streams}")


class _Handler(BaseHTTPRequestHandler):
    endpoint: FakeEndpoint
    protocol_version = "HTTP/1.0"  # the stream ends when the connection does (no chunked encoding)

    def log_message(self, *args) -> None:  # quiet: the test reads the records, not a log
        pass

    def reply(self, status: int, body, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": self.endpoint.model, "object": "model",
                                                         "max_model_len": 1024}]})
        else:
            self.reply(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/tokenize":
            ids = self.endpoint.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
            self.reply(200, {"count": len(ids), "max_model_len": 1024,
                             "tokens": [t + self.endpoint.tokenize_shift for t in ids]})
        elif self.path == "/v1/completions":
            self.complete(body)
        else:
            self.reply(404, {"detail": "Not Found"})

    def complete(self, body: dict) -> None:
        fake = self.endpoint
        with fake.lock:
            fake.requests.append(body)
            mode = fake.mode
        if body.get("model") != fake.model:
            return self.reply(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                              "type": "NotFoundError", "code": 404}})
        if mode == "http-error":
            return self.reply(500, {"error": {"message": "fake engine failure", "type": "InternalServerError"}})
        if mode == "html":
            return self.reply(200, b"<html><body>a captive portal</body></html>", "text/html")
        allowed = body.get("allowed_token_ids")
        tokens = list(fake.script[: body.get("max_tokens", 16)])
        if allowed:  # vLLM limits every token to these; the server asks for one
            tokens = [fake.first if fake.first in allowed else allowed[0]][: body.get("max_tokens", 1)]
        # aborted: a write failed because the client had gone (seen a token or two after it left)
        record = {"sent": 0, "aborted": False, "ended": False}
        with fake.lock:
            fake.streams.append(record)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            self.stream(body, tokens, mode, record)
        except (BrokenPipeError, ConnectionResetError):
            record["aborted"] = True
        finally:
            record["ended"] = True

    def stream(self, body: dict, tokens: list[int], mode: str, record: dict) -> None:
        fake = self.endpoint
        for i, token in enumerate(tokens):
            time.sleep(fake.delay_s)
            choice = {"index": 0, "text": fake.tokenizer.decode([token]), "finish_reason": None}
            if mode == "bad-ids":
                choice["token_ids"] = [10**9]
            elif mode != "text-only":
                choice["token_ids"] = [token]
            if i == len(tokens) - 1:
                choice["finish_reason"] = "length"
            line = "data: {not json at all" if mode == "garbage" else "data: " + json.dumps({"choices": [choice]})
            self.wfile.write((line + "\n\n").encode())
            self.wfile.flush()
            record["sent"] += 1
        if body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(tokens),
                     "prompt_tokens_details": {"cached_tokens": 0}}
            self.wfile.write(("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n").encode())
        if mode != "no-done":
            self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
