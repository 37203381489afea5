"""`bench --editor-session`: the replayed typing rebuilds the file."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_editor_session_replay_rebuilds_the_file():
    """The bench's typing session, applied to a buffer, yields the file plus its inserted edits,
    with every request inside the buffer."""
    import sysconfig
    from pathlib import Path

    from sdsat_lsp.tools.session_bench import session_steps

    text = (Path(sysconfig.get_paths()["stdlib"]) / "bisect.py").read_text()
    doc: list[str] = []
    requests = edits = 0
    for kind, payload in session_steps(text):
        if kind == "open":
            doc = payload.splitlines(keepends=True)
        elif kind == "type":
            row, col, chunk = payload
            while len(doc) <= row:
                doc.append("")
            line = doc[row]
            assert col <= len(line.rstrip("\n"))
            new = line[:col] + chunk + line[col:]
            doc[row: row + 1] = new.splitlines(keepends=True) or [""]
            edits += chunk.strip() == "# edited while typing"
        else:
            row, col = payload
            assert row <= len(doc) and col <= len(doc[row].rstrip("\n") if row < len(doc) else "")
            requests += 1
    assert "".join(line for line in doc if line.strip() != "# edited while typing") == text
    assert requests > text.count("\n") and edits >= 1
