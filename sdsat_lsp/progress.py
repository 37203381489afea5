"""A `$/progress` bar for long work on the server (the model load): created with
window/workDoneProgress/create when the client offers work-done progress. A client that refuses or
never answers gets no bar, and the work goes on the same: `report` and `end` then do nothing."""

from __future__ import annotations

import asyncio
import logging
import uuid

from lsprotocol import types

log = logging.getLogger(__name__)


class ProgressBar:
    def __init__(self, server, token: str | None):
        self.server, self.token = server, token

    @classmethod
    async def open(cls, server, message: str, timeout: float) -> ProgressBar:
        """A bar titled sdsat-lsp at 0% saying `message`; the client has `timeout` seconds to
        accept it (an unanswered request must not hold up the work)."""
        caps = server.client_capabilities
        if caps.window is None or not caps.window.work_done_progress:
            return cls(server, None)
        token = f"sdsat-load-{uuid.uuid4().hex[:8]}"
        try:
            await asyncio.wait_for(server.work_done_progress.create_async(token), timeout)
            server.work_done_progress.begin(token, types.WorkDoneProgressBegin(
                title="sdsat-lsp", message=message, percentage=0))
        except Exception as exc:  # refused or unanswered: no progress bar, the rest works
            log.info("window/workDoneProgress/create failed (%s): loading without a progress bar",
                     exc or type(exc).__name__)
            return cls(server, None)
        return cls(server, token)

    def report(self, message: str, percentage: int) -> None:
        if self.token is not None:
            self.server.work_done_progress.report(
                self.token, types.WorkDoneProgressReport(message=message, percentage=percentage))

    def end(self) -> None:
        if self.token is not None:
            self.server.work_done_progress.end(self.token, types.WorkDoneProgressEnd(message="done"))
