"""The document store: pygls' workspace, with documents that count lines and columns as LSP does.

pygls' `TextDocument` splits lines with `str.splitlines`, which also breaks at form feeds, vertical
tabs, U+0085, U+2028/U+2029 and U+001C-U+001E; LSP lines end only at `\\n`, `\\r\\n` and `\\r`. A file
with a form feed (common in GNU and older Python sources) or a U+2028 inside a string literal then
puts every later position on the wrong line: edits land in the wrong place and completions are
computed for the wrong cursor. pygls also clamps an out-of-range column to one before the line's end
(or past its line break), and writes the clamped value back into the request's params.

`Document` converts positions itself: lines end at `\\n`, `\\r\\n`, `\\r`; a column counts the
client's code units (UTF-16 unless negotiated); a column past the line's end means the line's end
(the spec's rule), a line past the last means the end of the document, and a column inside a
character (half of a surrogate pair) means after it. An edit with a reversed range is applied to
the normalized range, as VS Code's own model does.

Cost: an edit costs the edit, not the document. The text is held as pieces of up to `PIECE`
characters (`Text`), so replacing a range rebuilds the pieces it touches; beside them, the offsets
where lines start (`LineIndex`, a numpy array built in C-speed passes when the text arrives: about
0.1 s for 50 MB), so a conversion is a binary search plus a scan of one line, and an edit rescans
only the text it inserted and shifts the later starts in one vectorized add. The whole string is
joined again only when something asks for it (`source`: a completion, and only for documents within
the completion size limit). Before this, each edit split the whole text twice and copied it:
0.2-1.5 s of event loop per keystroke in a 50 MB document. A document given no text is empty: its
file is never read from disk (pygls' `source` would).
"""

from __future__ import annotations

import re
from bisect import bisect_right

from lsprotocol import types
from pygls.workspace import TextDocument, Workspace

_BREAK = re.compile(r"\r\n|\r|\n")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")

# Characters per piece of a document's text. An edit joins and splits the pieces it touches (tens of
# microseconds at this size) and shifts the offsets of the pieces after it in a Python loop (800
# pieces for 50 MB: well under a millisecond).
PIECE = 1 << 16
# Characters encoded to UTF-32 at a time when finding line breaks: bounds the temporary arrays (4 MB).
_SCAN = 1 << 20


def split_lines(text: str) -> list[str]:
    """LSP lines with their breaks; the empty line after a final break is not listed (as pygls)."""
    return _LINE.findall(text)


def break_ends(text: str, base: int = 0):
    """`base` + the offsets just after each LSP line break in `text` (a numpy int64 array); a "\r"
    that ends `text` counts as a break. Vectorized over code points, `_SCAN` characters at a time."""
    import numpy as np

    out = [np.zeros(0, dtype=np.int64)]
    for i in range(0, len(text), _SCAN):
        # One character more than the chunk: whether a "\r" at its end is half of a "\r\n".
        chunk = text[i:i + _SCAN + 1]
        n = min(_SCAN, len(text) - i)
        if chunk.isascii():  # most code: one byte a character, a quarter of UTF-32's work
            codes = np.frombuffer(chunk.encode("ascii"), dtype=np.uint8)
            if "\r" not in chunk:
                out.append(np.flatnonzero(codes[:n] == 10).astype(np.int64) + (base + i + 1))
                continue
        else:
            codes = np.frombuffer(chunk.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        newline = codes == 10
        followed = np.zeros(n, dtype=bool)
        followed[:len(codes) - 1] = newline[1:n + 1]
        ends = np.flatnonzero(newline[:n] | ((codes[:n] == 13) & ~followed))
        out.append(ends.astype(np.int64) + (base + i + 1))
    return np.concatenate(out)


class LineIndex:
    """The offsets where a text's LSP lines start, kept in step with edits at the cost of the edit.

    `starts[i]` is where line i starts; a text with b line breaks has b + 1 lines (the last one may
    be empty). A start s depends on the characters at s - 1 and s only (a break ends at s - 1; a "\r"
    there counts unless a "\n" follows), so replacing text[a:b] changes the starts in a..b and shifts
    those after b, whatever the edit does to "\r\n" pairs at its ends."""

    def __init__(self, text: str):
        import numpy as np

        self.starts = np.concatenate((np.zeros(1, dtype=np.int64), break_ends(text)))

    def __len__(self) -> int:
        return len(self.starts)

    def start(self, line: int) -> int | None:
        """Where `line` starts; None past the last line."""
        return int(self.starts[line]) if 0 <= line < len(self.starts) else None

    def next_start(self, line: int, text_len: int) -> int:
        """Where the line after `line` starts (the end of the text after the last line)."""
        return int(self.starts[line + 1]) if line + 1 < len(self.starts) else text_len

    def line_of(self, offset: int) -> int:
        """The line holding `offset` (a start belongs to the line it starts)."""
        return int(self.starts.searchsorted(offset, side="right")) - 1

    def replace(self, text: Text, a: int, b: int, inserted: int) -> None:
        """`text` now holds what it held with [a, b) replaced by `inserted` characters."""
        import numpy as np

        starts = self.starts
        # The first start >= a may change, except line 0's, which starts at 0 whatever the text.
        left = max(1, int(starts.searchsorted(a, side="left")))
        right = int(starts.searchsorted(b, side="right"))  # the first start > b only shifts
        hi = a + inserted
        # The breaks ending in a..hi start between a - 1 and hi + 1 (hi + 1: a "\r" at hi - 1 only
        # ends a line when no "\n" follows it at hi).
        lo = max(0, a - 1)
        found = break_ends(text.slice(lo, hi + 1), lo)
        middle = found[(found >= a) & (found <= hi)]
        tail = starts[right:]
        if inserted != b - a:
            tail = tail + (inserted - (b - a))
        self.starts = np.concatenate((starts[:left], middle, tail))


class Text:
    """A document's text as pieces of up to `PIECE` characters, with its line index: replacing a
    range rebuilds the pieces it touches. The whole string is joined on demand and kept until the
    next edit."""

    def __init__(self, text: str):
        # Split now, while the text arrives (didOpen is O(document) anyway), not at the first
        # keystroke; and hold one copy: the whole string is joined only for whoever asks for it.
        self.length = len(text)
        self.lines = LineIndex(text)
        self._pieces = [text[k:k + PIECE] for k in range(0, len(text), PIECE)]
        self._offsets = list(range(0, len(text), PIECE))  # where each piece starts
        self._whole: str | None = text if len(self._pieces) <= 1 else None

    def string(self) -> str:
        if self._whole is None:
            self._whole = "".join(self._pieces)
        return self._whole

    def slice(self, a: int, b: int) -> str:
        a, b = max(0, a), min(b, self.length)
        if a >= b:
            return ""
        if self._whole is not None:
            return self._whole[a:b]
        i = bisect_right(self._offsets, a) - 1
        out = []
        while a < b:
            start, piece = self._offsets[i], self._pieces[i]
            out.append(piece[a - start:b - start])
            a, i = start + len(piece), i + 1
        return "".join(out)

    def replace(self, a: int, b: int, new: str) -> None:
        """Replace [a, b) (0 <= a <= b <= length) with `new`."""
        pieces, offsets = self._pieces, self._offsets
        i = max(0, bisect_right(offsets, a) - 1)  # the piece holding a
        j = bisect_right(offsets, b)  # after the piece holding b (b itself may be its first character)
        lo = offsets[i] if pieces else 0
        merged = "".join(pieces[i:j])
        merged = merged[:a - lo] + new + merged[b - lo:]
        # Deletions shrink pieces: a short one takes in its neighbour, so pieces stay few.
        while len(merged) < PIECE // 2 and j < len(pieces):
            merged, j = merged + pieces[j], j + 1
        pieces[i:j] = [merged[k:k + PIECE] for k in range(0, len(merged), PIECE)]
        offsets[i:j] = [lo + k for k in range(0, len(merged), PIECE)]
        delta = len(new) - (b - a)
        if delta:
            for k in range(i + (len(merged) + PIECE - 1) // PIECE, len(offsets)):
                offsets[k] += delta
        self.length += delta
        self._whole = None
        self.lines.replace(self, a, b, len(new))


class Document(TextDocument):
    """A pygls text document with LSP line breaks, clamped positions and edits that cost the edit
    (see the module doc). pygls reads and writes `_source`; here it is a view of `Text`."""

    _text: Text

    @property
    def _source(self) -> str:
        return self._text.string()

    @_source.setter
    def _source(self, value: str | None) -> None:
        self._text = Text(value or "")

    @property
    def source(self) -> str:
        return self._text.string()

    def __len__(self) -> int:
        """Characters (code points) in the document, without joining its text."""
        return self._text.length

    def __bool__(self) -> bool:
        # An empty document is still a document: pygls' `get_text_document` tests it with `or`.
        return True

    def line_index(self) -> LineIndex:
        return self._text.lines

    @property
    def lines(self) -> list[str]:
        return split_lines(self.source)

    @property
    def _encoding(self) -> str:
        return str(getattr(self.position_codec.encoding, "value", self.position_codec.encoding) or "utf-16")

    def units(self, text: str) -> int:
        """Length of `text` in the client's code units."""
        encoding = self._encoding
        if encoding == "utf-32" or text.isascii():
            return len(text)
        if encoding == "utf-8":
            return len(text.encode("utf-8", "surrogatepass"))
        return len(text.encode("utf-16-le", "surrogatepass")) // 2

    def _column(self, content: str, units: int) -> int:
        """Code points of `content` that `units` client code units cover, rounded up."""
        encoding = self._encoding
        if units >= len(content) and self.units(content) <= units:
            return len(content)
        if encoding == "utf-32" or content.isascii():
            return min(units, len(content))
        if encoding == "utf-8":
            n = len(content.encode("utf-8", "surrogatepass")[:units].decode("utf-8", "ignore"))
            return min(len(content), n + (len(content[:n].encode("utf-8", "surrogatepass")) < units))
        # Half of a surrogate pair decodes to a lone surrogate: one code point, so this rounds up.
        return len(content.encode("utf-16-le", "surrogatepass")[: 2 * units].decode("utf-16-le", "surrogatepass"))

    @staticmethod
    def _content(line_text: str) -> str:
        """A line without its break."""
        ends = [i for i in (line_text.find("\n"), line_text.find("\r")) if i >= 0]
        return line_text[:min(ends)] if ends else line_text

    def offset_at_position(self, client_position: types.Position) -> int:
        """Code-point offset of a position in client units (never raises, never mutates it)."""
        text = self._text
        line = max(0, client_position.line)
        start = text.lines.start(line)
        if start is None:
            return text.length
        content = self._content(text.slice(start, text.lines.next_start(line, text.length)))
        return start + self._column(content, max(0, client_position.character))

    def position_at_offset(self, offset: int) -> tuple[types.Position, int, int]:
        """(position in client units, start and end of its line's content) for a code-point offset."""
        text = self._text
        offset = max(0, min(offset, text.length))
        line = text.lines.line_of(offset)
        start = text.lines.start(line)
        rest = self._content(text.slice(offset, text.lines.next_start(line, text.length)))
        if offset > start and text.slice(offset - 1, offset) == "\r":
            # Between the two halves of a "\r\n": counted as after a break, as a scan of the text
            # before the offset would (a client position never lands there).
            line, start = line + 1, offset
        return types.Position(line=line, character=self.units(text.slice(start, offset))), start, offset + len(rest)

    def _apply_incremental_change(self, change: types.TextDocumentContentChangePartial) -> None:
        start = self.offset_at_position(change.range.start)
        end = self.offset_at_position(change.range.end)
        if end < start:
            start, end = end, start
        self._text.replace(start, end, change.text)


class DocumentWorkspace(Workspace):
    """pygls' workspace holding `Document`s."""

    @classmethod
    def like(cls, other: Workspace, sync_kind: types.TextDocumentSyncKind) -> DocumentWorkspace:
        return cls(other.root_uri, sync_kind, list(other.folders.values()), other.position_encoding)

    def _create_text_document(self, doc_uri: str, source: str | None = None, version: int | None = None,
                              language_id: str | None = None) -> Document:
        return Document(doc_uri, source=source, version=version, language_id=language_id,
                        sync_kind=self._sync_kind, position_codec=self.position_codec)
