"""The document store (document.Document, pygls' workspace document with LSP positions): any
sequence of valid incremental edits gives the text that applying them to a plain string gives, in
UTF-16, UTF-8 and UTF-32 positions, with surrogate pairs, combining marks and every kind of line
break; positions out of range clamp as the spec says."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from lsprotocol import types
from pygls.workspace import PositionCodec, TextDocument

from sdsat_lsp.document import Document, split_lines

# What LSP calls a line break, written independently of the module under test.
BREAKS = ("\r\n", "\r", "\n")
PIECES = ["a", "bc", " ", "    ", "\t", "\n", "\r\n", "\r", "é", "e\u0301", "😋", "👨\u200d👩\u200d👧", "\x00",
          # Not line breaks in LSP, but str.splitlines breaks at each of them.
          "\x0c", "\x0b", "\x1c", "\x85", "\u2028", "\u2029"]
UNITS = {"utf-16": lambda s: len(s.encode("utf-16-le", "surrogatepass")) // 2,
         "utf-8": lambda s: len(s.encode("utf-8", "surrogatepass")), "utf-32": len}

texts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


def lsp_position(text: str, offset: int, encoding: str) -> types.Position:
    before = text[:offset]
    line = len(re.findall(r"\r\n|\r|\n", before))
    start = max(before.rfind("\n"), before.rfind("\r")) + 1
    return types.Position(line=line, character=UNITS[encoding](before[start:]))


def inside_crlf(text: str, offset: int) -> bool:
    return 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n"


def make(text: str, encoding: str, cls=Document) -> TextDocument:
    return cls("file:///t.py", source=text, version=1, position_codec=PositionCodec(encoding))


@settings(max_examples=300, deadline=None)
@given(texts, st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), texts), max_size=8),
       st.sampled_from(sorted(UNITS)))
def test_incremental_edits_equal_string_edits(text, edits, encoding):
    doc = make(text, encoding)
    for fa, fb, new in edits:
        a, b = sorted((int(fa * len(text)), int(fb * len(text))))
        a -= inside_crlf(text, a)  # a position cannot fall between "\r" and "\n"
        b -= inside_crlf(text, b)
        start, end = lsp_position(text, a, encoding), lsp_position(text, b, encoding)
        assert doc.offset_at_position(start) == a and doc.offset_at_position(end) == b
        assert doc.position_at_offset(a)[0] == start
        doc.apply_change(types.TextDocumentContentChangePartial(range=types.Range(start=start, end=end), text=new))
        text = text[:a] + new + text[b:]
        assert doc.source == text
    assert "".join(split_lines(text)) == text
    assert len(split_lines(text)) == len(re.findall(r"\r\n|\r|\n", text)) + (not text.endswith(BREAKS) and text != "")


@settings(max_examples=200, deadline=None)
@given(texts, st.integers(0, 50), st.integers(0, 400), st.sampled_from(sorted(UNITS)))
def test_positions_out_of_range_clamp(text, line, character, encoding):
    doc = make(text, encoding)
    lines = re.split(r"\r\n|\r|\n", text)
    offset = doc.offset_at_position(types.Position(line=line, character=character))
    if line >= len(lines):
        assert offset == len(text)  # past the last line: the end of the document
    else:
        line_start = sum(len(x) for x in re.split(r"(?<=\r\n)|(?<=\r)(?!\n)|(?<=\n)", text)[:line])
        content = lines[line]
        assert line_start <= offset <= line_start + len(content)
        if character >= UNITS[encoding](content):
            assert offset == line_start + len(content)  # past the line's end: the line's end


def test_half_a_surrogate_pair_rounds_up_and_params_stay_untouched():
    doc = make('x = "😋"\n', "utf-16")
    position = types.Position(line=0, character=6)  # between the two halves of the emoji
    assert doc.offset_at_position(position) == 6  # after the emoji
    far = types.Position(line=0, character=99)
    assert doc.offset_at_position(far) == 7 and far.character == 99  # pygls writes 7 back into it


def test_form_feed_is_not_a_line_break():
    text = "a = 1\x0c\nb = 2\nc = 3\n"
    ours, stock = make(text, "utf-16"), make(text, "utf-16", TextDocument)
    at = types.Position(line=2, character=0)
    assert text[ours.offset_at_position(at):].startswith("c = 3")
    assert not text[stock.offset_at_position(at):].startswith("c = 3")  # what pygls alone gets wrong


def test_reversed_range_is_normalized():
    doc = make("abcdef\n", "utf-16")
    doc.apply_change(types.TextDocumentContentChangePartial(
        range=types.Range(start=types.Position(0, 4), end=types.Position(0, 1)), text="X"))
    assert doc.source == "aXef\n"


def test_a_huge_line_converts_fast():
    """Found by the stress storm: pygls counts UTF-16 units one character at a time in Python, so a
    completion or an edit on a 2 MB line held the event loop for seconds (8 s measured here)."""
    import time

    line = "x = ['😋', " + ", ".join(str(i) for i in range(300_000))
    doc = make(line + "\n", "utf-16")
    started = time.perf_counter()
    for column in (len(line) // 2, len(line) + 5):
        offset = doc.offset_at_position(types.Position(line=0, character=column))
        assert doc.position_at_offset(offset)[0].character == min(column, len(line) + 1)
    doc.apply_change(types.TextDocumentContentChangePartial(
        range=types.Range(start=types.Position(0, 1000), end=types.Position(0, 1002)), text="y"))
    assert time.perf_counter() - started < 0.5


@settings(max_examples=300, deadline=None)
@given(texts, st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), texts), min_size=1, max_size=12))
def test_line_index_equals_a_fresh_split_after_random_edits(text, edits):
    """The line-start index, kept in step edit by edit (with pieces and scan chunks of a few
    characters, so that edits straddle pieces and "\\r\\n" pairs straddle chunks), equals the index
    of the resulting text computed from scratch, and the text equals the string edits."""
    from unittest import mock

    import numpy as np

    from sdsat_lsp import document

    with mock.patch.object(document, "PIECE", 4), mock.patch.object(document, "_SCAN", 3):
        doc = make(text, "utf-32")
        for fa, fb, new in edits:
            # Offsets anywhere, "\r\n" halves included: the index must survive an edit that splits
            # or joins a pair.
            a, b = sorted((int(fa * len(text)), int(fb * len(text))))
            doc._text.replace(a, b, new)
            text = text[:a] + new + text[b:]
            assert len(doc) == len(text)
        starts = doc.line_index().starts
        reference = [0] + [m.end() for m in re.finditer(r"\r\n|\r|\n", text)]
        assert starts.tolist() == reference
        assert np.array_equal(starts, document.LineIndex(text).starts)
        assert doc.source == text and doc._text.slice(1, len(text) - 1) == text[1:len(text) - 1]


def test_edits_in_a_50_mb_document_cost_the_edit():
    """Issue 17: each keystroke in a 50 MB document held the event loop 0.2-1.5 s (the text split
    into lines twice per edit, then copied whole). Measured on this 2-core VM with this test's text
    and edits: the code before the line index and the pieces, 1094 ms per edit on average (so this
    test failed); with them, 11 ms (the most, 31 ms)."""
    import time

    import numpy as np

    from sdsat_lsp.document import LineIndex

    lines = ["def f(x):\r\n", "    return x + 1  # é 😋\n", "\x0cclass C:\n", "    pass\r"]
    text = "".join(lines) * (50_000_000 // sum(map(len, lines)))
    doc = make(text, "utf-16")
    total_lines = len(doc.line_index())
    del text
    spent = []
    for i in range(100):
        line = (i * 7919) % (total_lines - 3)
        # Insertions, deletions and edits across lines, with and without line breaks.
        start, end, new = [((line, 4), (line, 4), "y\n"), ((line, 2), (line + 2, 1), ""),
                           ((line, 0), (line, 3), "zz\r"), ((line, 1), (line + 1, 0), "é\r\n")][i % 4]
        change = types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(*start), end=types.Position(*end)), text=new)
        began = time.perf_counter()
        doc.apply_change(change)
        spent.append(time.perf_counter() - began)
    assert sum(spent) / len(spent) < 0.1, f"mean {sum(spent) / len(spent) * 1e3:.0f} ms per edit"
    assert np.array_equal(doc.line_index().starts, LineIndex(doc.source).starts)


def test_an_empty_document_is_not_read_from_disk(tmp_path):
    """pygls' `source` reads the file when a document has no text, and its workspace's
    `get_text_document` replaces a falsy document with one read from disk."""
    from pygls.workspace import PositionCodec

    from sdsat_lsp.document import DocumentWorkspace

    path = tmp_path / "on_disk.py"
    path.write_text("secret = 1\n")
    doc = Document(path.as_uri(), source=None, version=1, position_codec=PositionCodec("utf-16"))
    assert doc.source == "" and len(doc) == 0 and doc
    workspace = DocumentWorkspace(tmp_path.as_uri(), types.TextDocumentSyncKind.Incremental)
    workspace.put_text_document(types.TextDocumentItem(uri=path.as_uri(), language_id="python", version=1, text=""))
    assert workspace.get_text_document(path.as_uri()).source == ""
