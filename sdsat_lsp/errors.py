"""The one error type that crosses the project's edges (CLI, LSP settings, model folders).

Internal invariants use asserts; anything a user can cause raises `SdsatError` with a message
that says what was wrong and how to fix it. The CLI prints it without a traceback.
"""


class SdsatError(Exception):
    """A problem the user can act on; the message is shown as-is."""
