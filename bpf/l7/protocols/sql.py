"""The operation class of an SQL statement, from its first keyword only.

The statement text never leaves this function: only one of OPS does.
"""
from __future__ import annotations

OPS = ("SELECT", "INSERT", "UPDATE", "DELETE", "BEGIN", "COMMIT", "ROLLBACK", "OTHER", "UNKNOWN")
# UNKNOWN: the text was not captured (or the statement was prepared before the
# capture started); OTHER: it was, and its first keyword is none of the above.

# How many bytes of a statement to look at: enough for a leading comment
# (sqlcommenter-style tags) before the keyword.
PEEK = 512

_KEYWORDS = {
    b"SELECT": "SELECT", b"INSERT": "INSERT", b"UPDATE": "UPDATE", b"DELETE": "DELETE",
    b"BEGIN": "BEGIN", b"COMMIT": "COMMIT", b"END": "COMMIT",  # END is PostgreSQL's COMMIT
    b"ROLLBACK": "ROLLBACK", b"ABORT": "ROLLBACK",
}
_SPACE = b" \t\r\n\f\v(;"


def classify(text: bytes, complete: bool = True) -> str:
    """One of OPS. complete=False when text is only the start of the statement."""
    i = _skip_space(text, 0)
    if i is None:
        return "OTHER" if complete else "UNKNOWN"
    word, j = _word(text, i)
    if not word:
        return "OTHER"
    if j == len(text) and not complete:
        return "UNKNOWN"  # the keyword itself may be cut
    word = word.upper()
    if word == b"START":  # START TRANSACTION is BEGIN (MySQL counts both as Com_begin)
        k = _skip_space(text, j)
        nxt, _ = _word(text, k) if k is not None else (b"", 0)
        return "BEGIN" if nxt.upper() == b"TRANSACTION" else "OTHER"
    return _KEYWORDS.get(word, "OTHER")


def _skip_space(text: bytes, i: int) -> int | None:
    """Index of the first byte past blanks and comments, None when the text ends first."""
    n = len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif text.startswith(b"--", i) or c == 0x23:  # '#' starts a MySQL comment
            j = text.find(b"\n", i)
            if j < 0:
                return None
            i = j + 1
        elif text.startswith(b"/*", i):
            j = text.find(b"*/", i + 2)
            if j < 0:
                return None
            i = j + 2
        else:
            return i
    return None


def _word(text: bytes, i: int) -> tuple[bytes, int]:
    j = i
    n = len(text)
    while j < n and j - i < 16 and (0x41 <= text[j] <= 0x5A or 0x61 <= text[j] <= 0x7A):
        j += 1
    return text[i:j], j
