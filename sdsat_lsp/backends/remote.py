"""A remote backend: the server builds the prompt, an OpenAI-compatible endpoint decodes it.

    job --worker thread: completion.request_prompt, healing.heal--> token ids, rules
        --event loop: endpoint.stream (ids in, tokens out)--> stopping.Stopper (the server's rules)
        --> Rules.finish --> the completion, as the local backend makes it

- The event loop never waits: tokenizing runs on the server's worker thread; the HTTP stream is
  asyncio (httpx2); per streamed token only the completion's text is decoded and checked.
- Cancel: a newer request for the document, `didClose` or `shutdown` set the job's cancel flag,
  which here cancels the request's task; `$/cancelRequest` cancels the handler and the task with
  it. Leaving the stream closes the connection, and vLLM aborts a request whose client is gone.
- Token healing (vllm): the first token comes from a one-token request limited to the healed
  tokens (`allowed_token_ids`), the rest from a second request whose prompt ends with it (vLLM's
  prefix cache holds the prompt by then). Greedy output is then the local engine's healed greedy.
- Failure: the endpoint down, too slow (no token by the request's deadline), refusing a request or
  answering garbage turns the server's state to `error` with the reason (`sdsat/status`), the
  completion is answered empty, and the endpoint is probed with backoff until it answers again;
  then the state is `ready` again. Until then requests are answered empty without a connection.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .. import jobs
from ..completion import model_text, request_prompt
from ..errors import SdsatError
from ..healing import heal, healed_decoder
from ..modelcard import ModelCard, read_model_card
from ..prompt import Completion, Rules, continuation_decoder
from ..session import Job, Outcome
from ..stopping import Stopper
from .endpoint import PROBE_TEXT, EndpointError, Served, base_url, new_client, probe, stream

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5  # the first probe after a failure; doubled after each failed probe
BACKOFF_MAX_S = 30.0


class _CancelTask(threading.Event):
    """A job's cancel flag that also cancels the task streaming its completion. Set on the event
    loop (a newer request, didClose) or, at exit, from the main thread: cancel through the loop."""

    def __init__(self, task: asyncio.Task, already: bool):
        super().__init__()
        self.task, self.loop = task, task.get_loop()
        if already:
            self.set()

    def set(self) -> None:
        super().set()
        try:
            self.loop.call_soon_threadsafe(self.task.cancel)
        except RuntimeError:  # the loop is closed: nothing runs any more
            pass


@dataclass
class RemoteModel:
    """What the server holds as `loaded` for a remote backend: the tokenizer, card and config of
    the model the endpoint serves (prompts are built here) and the endpoint. It has the attributes
    the server reads of a model.LoadedModel (model, tokenizer, card, ref, device, quantize, dtype,
    load_ms)."""

    model: Any  # holds `config` only: request_prompt reads the context length from it
    tokenizer: Any  # used on the worker thread (prompts)
    card: ModelCard
    ref: str
    device: str  # the endpoint's URL
    quantize: str  # "remote"
    dtype: str  # the backend's name
    load_ms: float
    backend: str
    served: Served
    eos_ids: list[int]
    vocab: int
    probe_ids: list[int]  # PROBE_TEXT in the server's tokenizer, for the reconnect probes
    # A copy for the event loop, where stream tokens are decoded: one fast tokenizer used from two
    # threads at once can fail ("Already borrowed"; draftbuild.py copies it for the same reason).
    loop_tokenizer: Any = None
    client: Any = None  # the httpx2.AsyncClient, made on the event loop at the first request
    reconnect: asyncio.Task | None = field(default=None, repr=False)
    failures: int = 0  # requests that failed on the endpoint, for sdsat/stats' requests and logs

    @property
    def url(self) -> str:
        return self.device

    def http(self):
        if self.client is None:
            self.client = new_client()
        return self.client

    # -- one request ------------------------------------------------------------------------------

    async def run_remote(self, server, job: Job) -> Outcome:
        """The completion for `job` (server.complete's counterpart of run_job on the worker)."""
        stats: dict[str, Any] = {"seq": job.seq, "requestId": job.request_id, "uri": job.uri,
                                 "queueMs": round((time.perf_counter() - job.created) * 1e3, 2), "backend": self.backend}
        task = asyncio.ensure_future(self.decode(server, job, stats))
        job.cancel = _CancelTask(task, job.cancel.is_set())
        try:
            await asyncio.wait({task})  # unlike awaiting the task, its cancellation does not raise here
        except asyncio.CancelledError:  # $/cancelRequest: the handler goes, and the request with it
            task.cancel()
            stats["finishReason"] = "cancelled"
            jobs.record(server, job, stats, None)
            raise
        completion = None
        if task.cancelled():
            stats["finishReason"] = "cancelled"
        elif isinstance(task.exception(), EndpointError):
            self.fail(server, str(task.exception()))
            stats.update(finishReason="backend-error", error=str(task.exception()))
        elif task.exception() is not None:  # a bug: server.complete answers it with an error
            exc = task.exception()
            log.error("[req %s] completion failed", job.request_id, exc_info=(type(exc), exc, exc.__traceback__))
            stats.update(finishReason="error", error=f"{type(exc).__name__}: {exc}")
        else:
            completion = task.result()
        return jobs.record(server, job, stats, completion)

    def prepare(self, s, job: Job):
        """On the worker: the prompt and its healing (the same functions as completion.complete)."""
        prompt, _, _ = request_prompt(self, s, model_text(job.text), job.offset, keep=job.doc.window_head)
        healing = heal(self.tokenizer, prompt.ids) if s.token_healing and self.backend == "vllm" else None
        return prompt, healing

    async def decode(self, server, job: Job, stats: dict) -> Completion | None:
        s = job.settings
        prompt, healing = await asyncio.get_running_loop().run_in_executor(server.worker, self.prepare, s, job)
        job.doc.window_head = prompt.window_head  # kept still while it fits: vLLM's prefix cache hits
        ids = healing.ids if healing is not None else prompt.ids
        rules = Rules(prompt.context)
        by_ids = self.backend == "vllm"
        # vllm: token ids decoded after the prompt, as the local engine's are; openai: the text pieces.
        decode = healed_decoder(continuation_decoder(self.loop_tokenizer, ids), healing) if by_ids else "".join
        hard = job.created + s.deadline_ms / 1e3 if s.deadline_ms else None
        stopper = Stopper(min(s.max_tokens, self.context() - len(ids)), self.eos_ids if by_ids else (), decode=decode,
                          should_stop=lambda tokens: rules.should_stop(decode(tokens)),
                          deadline=job.created + s.time_budget_ms / 1e3 if s.time_budget_ms else None, hard_deadline=hard)
        stats.update(promptTokens=len(ids), healed=healing is not None, multiline=prompt.context.multiline,
                     fim=prompt.fim, windowStart=prompt.prefix_start, mode="ar", newTokens=0)
        started = time.perf_counter()
        generating = self.generate(ids, healing.first_token_ids if healing else None, s, stopper, stats, started)
        try:
            await asyncio.wait_for(generating, None if hard is None else max(0.0, hard - time.perf_counter()))
        except asyncio.TimeoutError:
            if not stopper.tokens:
                raise EndpointError(f"no token within the {s.deadline_ms} ms deadline (deadlineMs): the endpoint is "
                                    "too slow or stuck") from None
            stopper.finish_reason = stopper.finish_reason or "deadline"
        stats.update(newTokens=len(stopper.tokens) if by_ids else stats.get("newTokens") or len(stopper.tokens),
                     finishReason=stopper.finish_reason or "length", wallMs=round((time.perf_counter() - started) * 1e3, 2))
        return rules.finish(decode(stopper.tokens))

    def context(self) -> int:
        return self.model.config.max_position_embeddings

    async def generate(self, ids: list[int], first_ids, s, stopper: Stopper, stats: dict, started: float) -> None:
        """Stream into `stopper` until it or the endpoint ends the completion (first_ids: token healing)."""
        body = self.body(s)
        if stopper.max_new_tokens <= 0:
            stopper.finish_reason = "length"
            return
        stats["requests"] = 1
        if first_ids:  # the first token alone, among the healed ones; then the rest after it
            stats["requests"] = 2
            if await self.stream_into({**body, "prompt": ids, "max_tokens": 1, "allowed_token_ids": list(first_ids)},
                                      stopper, stats, started, first_only=True):
                return
            if len(stopper.tokens) != 1:
                raise EndpointError(f"a one-token request answered {len(stopper.tokens)} tokens")
            ids = ids + stopper.tokens
        remaining = stopper.max_new_tokens - len(stopper.tokens)
        await self.stream_into({**body, "prompt": ids, "max_tokens": remaining}, stopper, stats, started)

    async def stream_into(self, body: dict, stopper: Stopper, stats: dict, started: float, first_only=False) -> bool:
        """One request's tokens into `stopper`; True once the completion is over."""
        by_ids = self.backend == "vllm"
        async with aclosing(stream(self.http(), self.url, body, lambda t: 0 <= t < self.vocab)) as chunks:
            async for chunk in chunks:
                if chunk.usage is not None:
                    details = chunk.usage.get("prompt_tokens_details") or {}
                    stats["reusedTokens"] = details.get("cached_tokens") if isinstance(details, dict) else None
                    stats["newTokens"] = chunk.usage.get("completion_tokens")
                if by_ids and chunk.token_ids is None and chunk.text:
                    raise EndpointError("the endpoint streams text without token ids (vLLM's return_token_ids); "
                                        "use backend openai for a plain OpenAI-compatible endpoint")
                pieces = (chunk.token_ids or []) if by_ids else ([chunk.text] if chunk.text else [])
                if pieces and "firstTokenMs" not in stats:
                    stats["firstTokenMs"] = round((time.perf_counter() - started) * 1e3, 2)
                if stopper.push_all(pieces):
                    return True  # leaving the stream closes the connection: the endpoint aborts
                if chunk.finish_reason is not None and not first_only:
                    # The endpoint stopped: at the model's EOS ("stop") or at max_tokens ("length").
                    stopper.finish_reason = "eos" if chunk.finish_reason == "stop" else "length"
        return stopper.finish_reason is not None

    def body(self, s) -> dict:
        body: dict[str, Any] = {"model": self.served.model, "stream": True, "temperature": s.temperature,
                                "top_p": s.top_p, "stream_options": {"include_usage": True}}
        if s.seed >= 0:
            body["seed"] = s.seed
        if self.backend == "vllm":
            body["return_token_ids"] = True
            if s.top_k > 0:
                body["top_k"] = s.top_k
        return body

    # -- failure and recovery -------------------------------------------------------------------

    def fail(self, server, reason: str) -> None:
        """The endpoint failed a request: the error state with the reason, and probes until it answers."""
        self.failures += 1
        log.warning("%s endpoint %s: %s", self.backend, self.url, reason)
        if server.loaded is not self:
            return
        if server.state == "ready":
            server.set_state("error", f"{self.backend} endpoint {self.url}: {reason}; retrying in {BACKOFF_FIRST_S:g} s")
            server.log_to_client(f"sdsat-lsp: {self.backend} endpoint {self.url} failed: {reason}")
        if self.reconnect is None or self.reconnect.done():
            self.reconnect = asyncio.ensure_future(self.probe_until_up(server))

    async def probe_until_up(self, server) -> None:
        delay, failed_since = BACKOFF_FIRST_S, time.perf_counter()
        while True:
            await asyncio.sleep(delay)
            if server.loaded is not self:  # reloaded meanwhile: the new backend has its own state
                return
            try:
                await probe(self.http(), self.url, self.served.model, self.probe_ids, self.backend == "vllm")
            except EndpointError as exc:
                delay = min(delay * 2, BACKOFF_MAX_S)
                if server.loaded is self:
                    server.set_state("error", f"{self.backend} endpoint {self.url}: {exc}; retrying in {delay:g} s")
                continue
            if server.loaded is self:
                down = time.perf_counter() - failed_since
                server.log_to_client(f"sdsat-lsp: {self.backend} endpoint {self.url} answers again after {down:.1f} s")
                server.set_state("ready", f"{self.ready_message()}; reconnected after {down:.1f} s")
            return

    def ready_message(self) -> str:
        return (f"{self.ref} ready: remote, {self.backend} on {self.url}, k={self.card.k}, "
                f"loaded in {self.load_ms:.0f} ms")


# ----------------------------------------------------------------------------------------------
# Start-up (on the server's worker thread, as loading.load_blocking).


def load_remote(settings, report) -> RemoteModel:
    """The server's tokenizer, card and config for the model the endpoint serves, and the endpoint
    checked: it answers, serves that model (backendModel) and tokenizes as the server does."""
    started = time.perf_counter()
    if not settings.backend_url:
        raise SdsatError(f"backend {settings.backend} needs backendUrl, the endpoint (e.g. http://127.0.0.1:8000)")
    report("loading the tokenizer", 30)
    from transformers import AutoConfig, AutoTokenizer

    from ..embedded import default_model_ref
    from ..model import resolve_folder

    ref = settings.model or default_model_ref()
    folder = resolve_folder(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise SdsatError(f"could not load the tokenizer of {folder}: {exc}") from exc
    # The endpoint decodes plainly: no adaptive ids, so no SDSAT mode and no draft store here.
    card = dataclasses.replace(read_model_card(folder) or read_model_card(str(ref)) or ModelCard(adaptive_ids=[]),
                               adaptive_ids=[])
    card.context_length = card.context_length or getattr(config, "max_position_embeddings", None)
    probe_ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    url = base_url(settings.backend_url)
    report(f"checking the endpoint {url}", 60)
    try:
        served = asyncio.run(_probe_once(url, settings, probe_ids))  # its own loop, on the worker thread
    except EndpointError as exc:
        raise SdsatError(f"{settings.backend} endpoint {url}: {exc}") from exc
    if not served.tokenizer_checked:
        log.warning("%s has no /tokenize: the tokenizer could not be checked against the server's", url)
    lengths = [n for n in (card.context_length, getattr(config, "max_position_embeddings", None), served.max_model_len) if n]
    eos = getattr(config, "eos_token_id", None)
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    return RemoteModel(
        model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=min(lengths) if lengths else 2**31)),
        tokenizer=tokenizer, card=card, ref=str(ref), device=url, quantize="remote", dtype=settings.backend,
        load_ms=(time.perf_counter() - started) * 1e3, backend=settings.backend, served=served, eos_ids=eos_ids,
        vocab=max(len(tokenizer), int(getattr(config, "vocab_size", 0) or 0)), probe_ids=list(probe_ids),
        loop_tokenizer=copy.deepcopy(tokenizer))


async def _probe_once(url: str, settings, probe_ids) -> Served:
    client = new_client()
    try:
        return await probe(client, url, settings.backend_model, probe_ids, settings.backend == "vllm")
    finally:
        await client.aclose()
