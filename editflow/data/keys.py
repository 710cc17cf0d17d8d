"""Unique sample keys.

WebDataset groups a sample's files by the name before the first dot, so a key keeps only [A-Za-z0-9_-]
and two samples under one key would silently merge. The rules, chosen so that a record gets the same key
in every run whatever the order or the other records (reruns resume by position and must agree):

- an id that is already a valid key is the key (GPT-IMAGE-EDIT's `hqedit_edit_00060995`);
- an id the sanitiser changes (`v1.0`, non-ASCII, over 64 characters) gets a hash of the id appended,
  so ids that sanitise alike (`v1.0` / `v1_0`, any two non-ASCII ids) stay apart: distinct ids are
  distinct records and dropping one would lose data;
- the same id twice with the same images and instruction is a duplicate: a reject naming the first
  record (keeping it would double its weight). The same id on different content is kept under the id's
  key plus a hash of its location and counted (`ids_reused`): such ids label variants (a rewritten
  instruction for the same images), not mistakes;
- no id: `<file stem>_<record number>`, plus a hash of the file when two files share a stem.
A key still taken after all this (only by a hash collision) is a reject naming both records.
"""

from __future__ import annotations

import hashlib
import re

MAX_KEY = 64  # tar (USTAR) names hold 100 characters: key + hash + ".ref12.webp" must fit
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str) -> str:
    """Only [A-Za-z0-9_-]; empty when nothing of `text` is left."""
    return _UNSAFE.sub("_", str(text)).strip("_")


def short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=5).hexdigest()


def key_of_id(record_id: str) -> str:
    base = safe_key(record_id)
    if base == record_id and len(base) <= MAX_KEY:
        return base
    return f"{base[:MAX_KEY] or 'id'}-{short_hash(record_id)}"


class KeyRegistry:
    """Assigns every record of a conversion its key, in the records' deterministic order."""

    def __init__(self) -> None:
        self._ids: dict[str, tuple[str, bytes]] = {}  # id -> (location of its first record, content digest)
        self._keys: dict[str, str] = {}  # key -> location
        self.ids_reused = 0

    def assign(self, record_id: str | None, stem: str, file: str, number: int,
               content: tuple) -> tuple[str, tuple[str, str] | None]:
        """(key, None), or (key, (reason, detail)) when the record must be rejected."""
        location = f"{file}:{number}"
        if record_id is None:
            key = key_of_id(f"{safe_key(stem)[:40] or 'record'}_{number:09d}")
            if key in self._keys:
                key = f"{key}-{short_hash(file)}"
        else:
            key = key_of_id(record_id)
            digest = hashlib.blake2b(repr(content).encode("utf-8", "surrogatepass"), digest_size=16).digest()
            first = self._ids.get(record_id)
            if first is None:
                self._ids[record_id] = (location, digest)
            elif first[1] == digest:
                return key, ("duplicate_record", f"id {record_id!r} with the same images and instruction is also "
                                                 f"record {first[0]}; the copy is left out")
            else:
                key = f"{key}-{short_hash(location)}"
                self.ids_reused += 1
        if key in self._keys:
            return key, ("key_collision", f"key {key!r} is already the key of record {self._keys[key]}")
        self._keys[key] = location
        return key, None
