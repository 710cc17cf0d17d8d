"""Records of one metadata file: a JSON list or JSON lines, whatever the file's suffix.

A record's number counts from 1 in file order: the line of a JSON-lines file (blank lines count, so it
is the line an editor shows) or the position in a JSON list; rejects print `file:number`. Bytes that are
not UTF-8 are carried through parsing as lone surrogates (`surrogateescape`), so one bad byte rejects
the one record holding it, naming its field, and the rest of the file converts. Problems that make a
whole file unreadable (not JSON at all, UTF-16, a syntax error inside a JSON list, one JSON object
instead of records) raise `DataError` while the metadata is scanned, before any image is read.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

from editflow.data.errors import DataError

# (record number, the record or None, (reject reason, detail) or None)
Item = tuple[int, dict | None, tuple[str, str] | None]

_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # before UTF-16: same prefix
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
_SPACE = re.compile(r"\s*")


def iter_records(name: str, open_binary: Callable[[], BinaryIO]) -> Iterator[Item]:
    """Every record of the metadata file `name` (a path or `archive:member`), read from `open_binary()`."""
    with open_binary() as stream:
        lines = iter(stream)
        consumed: list[bytes] = []
        for line in lines:  # the first non-blank line tells a JSON list from JSON lines
            consumed.append(line)
            if line.strip():
                break
        head = b"".join(consumed)
        for bom, encoding in _WIDE_BOMS:
            if head.startswith(bom):
                raise DataError(f"{name} is {encoding}-encoded; metadata must be UTF-8: convert it with "
                                f"`iconv -f {encoding} -t UTF-8 {name} > fixed.json` and pass the fixed file.")
        start = head.removeprefix(codecs.BOM_UTF8).lstrip()[:1]
        if not start:
            return  # empty file: no records
        if start == b"[":
            yield from _list_records(name, head + stream.read())
        elif start == b"{":
            yield from _line_records(name, consumed, lines)
        else:
            shown = head.removeprefix(codecs.BOM_UTF8).lstrip()[:60]
            raise DataError(f"{name} is not JSON metadata: it starts with {shown!r}. Expected a JSON list of "
                            "records or one JSON object per line; pass the dataset's metadata .json/.jsonl files "
                            "(or the folder holding them).")


def _checked(value, number: int) -> Item:
    if not isinstance(value, dict):
        return number, None, ("bad_json", f"record is a JSON {type(value).__name__}, expected an object with fields")
    bad = _not_utf8(value)
    if bad:
        field, byte = bad
        return number, None, ("not_utf8", f"field {field!r} holds a byte that is not UTF-8 (0x{byte:02x}); re-save "
                                          "the file as UTF-8 to keep this record")
    return number, value, None


def _not_utf8(value, path: str = "") -> tuple[str, int] | None:
    """(field path, first bad byte) of the first string holding a non-UTF-8 byte."""
    if isinstance(value, str):
        found = _NOT_UTF8.search(value)
        return (path or "<record>", ord(found.group()) - 0xDC00) if found else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        here = f"{path}.{key}" if path and isinstance(key, str) else f"{path}[{key}]" if path else str(key)
        bad = _not_utf8(key, here) if isinstance(key, str) else None
        bad = bad or _not_utf8(item, here)
        if bad:
            return bad
    return None


def _line_records(name: str, consumed: list[bytes], rest: Iterator[bytes]) -> Iterator[Item]:
    for number, line in enumerate(itertools.chain(consumed, rest), start=1):
        text = line.decode("utf-8", "surrogateescape")
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            if number == len(consumed) and text.strip() == "{":  # first line of a pretty-printed object
                raise DataError(f"{name} holds a pretty-printed JSON object, not records: expected a JSON list of "
                                "records or one JSON object per line.") from None
            if _NOT_UTF8.search(text):
                yield number, None, ("not_utf8", f"line {number} is not UTF-8 and not valid JSON ({err.msg})")
            else:
                yield number, None, ("bad_json", f"line {number} is malformed JSON ({err.msg} at column {err.colno})")
            continue
        yield _checked(value, number)


def _list_records(name: str, data: bytes) -> Iterator[Item]:
    """The elements of a JSON list one at a time (`raw_decode`), so a syntax error names its line and record."""
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text, text.index("[") + 1).end()
    number = 0
    while pos < len(text) and text[pos] != "]":
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            if not text[err.pos:].strip():
                raise DataError(f"{name}: the file ends inside record {number + 1} of the JSON list: it is truncated; "
                                "re-download it.") from None
            raise DataError(f"{name}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg}), in record "
                            f"{number + 1} of the list; a JSON list cannot be read past a syntax error: fix or "
                            "re-download the file.") from None
        number += 1
        yield _checked(value, number)
        pos = _SPACE.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = _SPACE.match(text, pos + 1).end()
        elif pos < len(text) and text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{name}: malformed JSON at line {line} after record {number}: expected ',' or ']'; "
                            "the file is truncated or not one JSON list: fix or re-download it.")
    if pos >= len(text):
        raise DataError(f"{name}: the JSON list ends without ']' after record {number}: the file is truncated; "
                        "re-download it.")
    if text[pos + 1:].strip():
        raise DataError(f"{name}: data after the end of the JSON list (line {text.count(chr(10), 0, pos) + 1}); "
                        "the file holds more than one JSON value.")
