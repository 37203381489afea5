"""The VS Code extension sends the server every setting it declares: a setting in package.json
that the extension never forwards would do nothing, silently."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from sdsat_lsp.settings import Settings, camel

EXTENSION = Path(__file__).resolve().parents[1] / "editors" / "vscode"


def _ts_list(source: str, name: str) -> list[str]:
    match = re.search(rf"const {name} = \[(.*?)\] as const;", source, re.S)
    assert match, f"{name} not found in settings.ts"
    return re.findall(r"'([^']+)'", match.group(1))


def test_every_declared_setting_reaches_the_server_or_restarts_it():
    package = json.loads((EXTENSION / "package.json").read_text())
    configuration = package["contributes"]["configuration"]
    declared = {key.removeprefix("sdsat.") for key in (configuration if isinstance(configuration, dict)
                                                       else configuration[0])["properties"]}
    source = (EXTENSION / "src" / "settings.ts").read_text()
    server_keys, restart_keys = _ts_list(source, "SERVER_KEYS"), _ts_list(source, "RESTART_KEYS")
    assert set(server_keys) | set(restart_keys) == declared
    understood = {camel(f.name) for f in dataclasses.fields(Settings)}
    assert set(server_keys) <= understood, set(server_keys) - understood


def test_a_workspace_cannot_choose_what_runs_or_what_it_loads():
    """What runs comes from user or machine settings only (`machine` scope: VS Code ignores a
    workspace's `.vscode/settings.json` for it), and in Restricted Mode a workspace cannot choose the
    model, the draft-store folder or the cache budget. tests/e2e/test_vscode.py checks both in a
    real VS Code."""
    package = json.loads((EXTENSION / "package.json").read_text())
    properties = package["contributes"]["configuration"]["properties"]
    assert properties["sdsat.serverCommand"]["scope"] == "machine"
    assert properties["sdsat.serverArgs"]["scope"] == "machine"
    untrusted = package["capabilities"]["untrustedWorkspaces"]
    assert untrusted["supported"] == "limited"
    restricted = set(untrusted["restrictedConfigurations"])
    assert {"sdsat.model", "sdsat.draftStore", "sdsat.cacheBudgetMb"} <= restricted <= set(properties)


def test_declared_ranges_are_the_servers():
    """A range the extension declares is the one the server enforces: VS Code's settings editor
    would otherwise accept values the server replaces by defaults (or refuse ones it takes). The
    cache budget's ceiling (issue 17: 16 TiB was accepted) is one of them."""
    from sdsat_lsp.settings import _RANGES

    package = json.loads((EXTENSION / "package.json").read_text())
    properties = package["contributes"]["configuration"]["properties"]
    by_wire = {camel(name): name for name in _RANGES}
    declared = {key.removeprefix("sdsat."): (p["minimum"], p["maximum"]) for key, p in properties.items()
                if "minimum" in p or "maximum" in p}
    assert declared, "no ranges declared"
    for key, (lo, hi) in declared.items():
        assert key in by_wire, f"{key}: declared with a range the server does not check"
        assert (lo, hi) == _RANGES[by_wire[key]], key
    assert _RANGES["cache_budget_mb"] == (0, 65536)
