"""Test-only fault hooks, all in one place, each switched on by an environment variable that the
fault tests (tests/test_faults.py) set for the server they start. Unset, none of them does anything.

- SDSAT_LSP_TEST_LOAD_DELAY_S=s: loading waits s seconds first (tests that must meet a server
  still loading).
- SDSAT_LSP_TEST_FAIL_PASS=n: the n-th forward pass after loading raises, once (a model failing
  in the middle of a decode).
- SDSAT_LSP_TEST_FILE_DELAY_S=s: each file tokenized for a draft store waits s seconds first (a
  build that takes long enough for a test to change its mind).
- SDSAT_LSP_TEST_LIMITS={"module.NAME": value, ...}: the server's limits (upper-case constants of
  sdsat_lsp modules, e.g. "session.MAX_DOCUMENTS") set small, so that tests reach them with small
  inputs.
"""

from __future__ import annotations

import os
import time

LOAD_DELAY = "SDSAT_LSP_TEST_LOAD_DELAY_S"
FAIL_PASS = "SDSAT_LSP_TEST_FAIL_PASS"
LIMITS = "SDSAT_LSP_TEST_LIMITS"
FILE_DELAY = "SDSAT_LSP_TEST_FILE_DELAY_S"


def before_file() -> None:
    if os.environ.get(FILE_DELAY):
        time.sleep(float(os.environ[FILE_DELAY]))


def apply_test_limits() -> None:
    if not os.environ.get(LIMITS):
        return
    import importlib
    import json

    for name, value in json.loads(os.environ[LIMITS]).items():
        module, _, attr = name.rpartition(".")
        target = importlib.import_module(f"sdsat_lsp.{module}")
        if not attr.isupper() or not hasattr(target, attr):
            raise ValueError(f"{LIMITS}: no limit {name}")
        setattr(target, attr, value)


def before_loading() -> None:
    if os.environ.get(LOAD_DELAY):
        time.sleep(float(os.environ[LOAD_DELAY]))


def after_loading(model) -> None:
    if os.environ.get(FAIL_PASS):
        fail_at_pass(model, int(os.environ[FAIL_PASS]))


def fail_at_pass(model, n: int) -> None:
    """The n-th forward pass of `model` from now raises, once."""
    calls = 0

    def hook(module, args):
        nonlocal calls
        calls += 1
        if calls == n:
            handle.remove()
            raise RuntimeError(f"injected fault at forward pass {n} ({FAIL_PASS})")

    # On the decoder: the engine runs it directly when it applies the output head itself.
    handle = getattr(model, "model", model).register_forward_pre_hook(hook)
