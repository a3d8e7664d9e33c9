"""The one exception wire parsers raise, and the input coercion every parser shares."""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview


class Malformed(ValueError):
    """A frame or header is truncated, has inconsistent lengths or bad fixed fields.

    Parsers raise only this, so callers can drop guest input with one `except` clause.
    """


def as_view(buf: Buffer) -> memoryview:
    """A flat byte memoryview over `buf` (no copy); anything else is Malformed.

    Callers may hand us memoryviews of another format or shape (e.g. a ring buffer viewed as
    words); casting keeps every later slice and index in bytes.
    """
    try:
        view = memoryview(buf)
        if not view.c_contiguous:
            raise Malformed("not a contiguous byte buffer")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except (TypeError, ValueError) as e:
        raise Malformed(f"not a contiguous byte buffer: {e}") from None
    return view
