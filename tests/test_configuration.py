"""Settings over LSP: configuration changes apply (model settings reload the model), a model that
fails to load is reported and a good one recovers, and the draft store builds beside the worker
without changing any answer."""

from __future__ import annotations

import asyncio
import time

import pytest

from sdsat_lsp.decoding import TREE_NODES

from documents import WALK_MODULE as DOC  # tests/documents.py
from lsp_client import BASE_OPTIONS, Session, capabilities, offset_of

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_configuration_changes_apply(main_server):
    uri = "file:///config.py"
    main_server.open(uri, DOC)
    try:
        main_server.configure({"sdsat": {"maxTokens": 3, "mode": "ar"}})
        await main_server.inline(uri, 15, 12)
        s = await main_server.last_request(uri)
        assert s["newTokens"] <= 3 and s["mode"] == "ar" and s["draftsVerified"] == 0
        # Wrong types: a warning, the defaults for those values, and the server keeps serving.
        shown = len(main_server.client.messages)
        main_server.configure({"maxTokens": "many", "temperature": "hot", "lineMode": 7, "kvCache": "yes",
                               "nonsense": 1, "mode": "fused", "draftLength": "huge", "lookupNgram": -1,
                               "treeNodes": 65})
        await main_server.inline(uri, 15, 12)
        settings = (await main_server.stats())["settings"]
        assert settings["maxTokens"] == 64 and settings["temperature"] == 0.0 and settings["lineMode"] == "auto"
        assert settings["mode"] == "fused" and settings["kvCache"] is True
        assert settings["draftLength"] == "adaptive" and settings["lookupNgram"] == 3 and settings["treeNodes"] == TREE_NODES
        warning = main_server.client.messages[shown].message
        assert "maxTokens" in warning and "temperature" in warning and "nonsense" in warning
        assert "draftLength" in warning and "lookupNgram" in warning and "treeNodes" in warning
        main_server.configure({"lookupNgram": 0, "draftLength": "fixed", "treeNodes": 0})
        await main_server.inline(uri, 15, 12)
        s = await main_server.last_request(uri)
        assert s["lookupAccepted"] == 0
        assert (await main_server.stats())["settings"]["draftLength"] == "fixed"
        assert (await main_server.stats())["settings"]["treeNodes"] == 0
        main_server.configure(["not", "an", "object"])
        main_server.configure(None)
        await main_server.inline(uri, 15, 12)
        # Turning the cache off: nothing reused.
        main_server.configure({"kvCache": False})
        await main_server.inline(uri, 15, 12)
        await main_server.inline(uri, 15, 12)
        s = await main_server.last_request(uri)
        assert s["reusedTokens"] == 0 and (await main_server.stats())["cache"]["bytes"] == 0
    finally:
        main_server.configure(BASE_OPTIONS | {"kvCache": True, "mode": "fused", "lookupNgram": 3, "draftLength": "adaptive"})
        main_server.close(uri)


async def test_model_error_then_recovery(main_server, tiny_model_dir):
    uri = "file:///model.py"
    main_server.open(uri, DOC)
    try:
        main_server.configure({"model": "/no/such/model/folder"})
        status = await main_server.wait_state("error", 60)
        assert "does not exist" in status["message"]
        assert not (await main_server.inline(uri, 15, 12)).items
        main_server.configure({"model": str(tiny_model_dir)})
        await main_server.wait_state("ready", 60)
        await main_server.inline(uri, 15, 12)
        assert (await main_server.last_request(uri))["finishReason"] in ("length", "stop", "eos")
    finally:
        main_server.close(uri)


async def test_draft_store_builds_beside_the_worker_and_never_changes_answers(tiny_model_dir, reference, tmp_path):
    """A folder as the draft store: built in the background, its drafts verified like any others
    (answers equal plain greedy decoding); turned off, or pointed at nothing, the server goes on."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "walk.py").write_text(DOC)
    session = await Session.start({"model": str(tiny_model_dir), **BASE_OPTIONS, "draftStore": str(folder)}, capabilities(),
                                  env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    uri = "file:///store.py"

    async def store_state(state: str) -> dict:
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            info = (await session.stats())["draftStore"]
            if info["state"] == state:
                return info
            await asyncio.sleep(0.1)
        raise AssertionError(f"draft store never {state!r}: {info}")

    try:
        info = await store_state("ready")
        assert info["source"] == str(folder) and info["tokens"] > 50
        assert list((tmp_path / "cache" / "sdsat-lsp" / "draftstores").glob("*.npz"))  # cached for the next start
        session.open(uri, DOC)
        store_passes = 0
        for line, column in ((15, 12), (6, 4), (3, 0)):
            _, expected, _ = reference(DOC, offset_of(DOC, line, column))
            result = await session.inline(uri, line, column)
            assert [item.insert_text for item in result.items] == ([expected.text] if expected else [])
            store_passes += (await session.last_request(uri))["storePasses"]
        assert store_passes > 0
        session.configure({"draftStore": "off"})
        assert (await store_state("off")) == {"state": "off"}
        await session.inline(uri, 15, 12)
        assert (await session.last_request(uri))["storePasses"] == 0
        shown = len(session.client.messages)
        session.configure({"draftStore": str(tmp_path / "no-such-folder")})
        assert "no such folder" in (await store_state("error"))["message"]
        assert "no such folder" in session.client.messages[shown].message
        _, expected, _ = reference(DOC, offset_of(DOC, 15, 12))
        assert [item.insert_text for item in (await session.inline(uri, 15, 12)).items] == [expected.text]
    finally:
        await session.stop()


async def test_server_flags_set_their_settings():  # async: the module runs on one loop
    """Each server flag of the command line sets the setting of its name; the others keep their
    defaults."""
    from sdsat_lsp.cli import build_parser
    from sdsat_lsp.settings import CLI_FLAGS, Settings, from_command_line

    parser = build_parser(tools=False)
    assert from_command_line(parser.parse_args([])) == Settings()
    args = parser.parse_args(["--model", "m", "--quantize", "none", "--device", "cpu", "--backend", "vllm",
                              "--backend-url", "http://127.0.0.1:1", "--backend-model", "served"])
    got = from_command_line(args)
    assert (got.model, got.quantize, got.device, got.backend, got.backend_url, got.backend_model) == (
        "m", "none", "cpu", "vllm", "http://127.0.0.1:1", "served")
    assert set(CLI_FLAGS) == {"--model", "--quantize", "--device", "--backend", "--backend-url", "--backend-model"}
    assert got.dtype == Settings().dtype and got.max_tokens == Settings().max_tokens
