"""Dataset archives read in place: split `.tar.gz.partNNN` sets and plain `.tar` parts, never extracted.

A split set is one gzip stream once its parts are concatenated in order, so `tarfile` reads it in stream
mode over a reader that chains the part files: no extraction, no seeking, no temporary copy. A gzip
stream can only be read front to back, and a record's images and its metadata may sit anywhere in the
archive (the released archives hold a task's inputs, then its outputs, with the metadata json anywhere),
so conversion reads each archive at most twice:

1. `index_archives`: every member's name and size, and the bytes of the metadata members. A single
   plain `.tar` is indexed by seeking from header to header, which reads almost nothing.
2. `assemble`: knowing every record's members, the order they arrive in and so the member at which each
   record becomes complete, it reads the archives again and hands out each record with its images as
   soon as its last member has been read. An earlier member is held only until the last record that
   needs it is complete; held members beyond the memory budget are spilled to a scratch folder, those
   needed furthest in the future first (Belady's rule: what stays in memory is what leaves soonest).
   The same rule run on sizes alone (`peak_hold`) tells, before the second read starts, how much
   memory and scratch space the read will take.

Members of records that earlier runs already wrote into finished shards are not held at all, and the
second read stops after the last member still needed, so a resumed conversion holds only what is left.
"""

from __future__ import annotations

import bisect
import dataclasses
import gzip
import heapq
import io
import os
import posixpath
import re
import shutil
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

from editflow.data.errors import DataError

ARCHIVE_NAME = re.compile(r"^(?P<base>.+\.(?:tar|tar\.gz|tgz))(?:\.part(?P<part>\d+|[a-z]+))?$", re.IGNORECASE)


def is_archive(path: Path) -> bool:
    return ARCHIVE_NAME.match(path.name) is not None


def member_name(name: str) -> str:
    """The path of a member as records name it: no leading `./` or `/`, no `a/../b`."""
    return posixpath.normpath(name).lstrip("/")


@dataclasses.dataclass
class ArchiveSet:
    """One archive: a single file, or the ordered parts of a split one."""

    name: str  # the archive's path, or for a split set the path of the whole (`.../hqedit.tar.gz`)
    parts: list[Path]

    @property
    def gzip(self) -> bool:
        return self.name.lower().endswith((".gz", ".tgz"))

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.parts)


def _part_number(suffix: str) -> int:
    if suffix.isdigit():
        return int(suffix)
    number = 0
    for letter in suffix.lower():  # `split`'s default suffixes: aa, ab, ..., az, ba, ...
        number = number * 26 + ord(letter) - ord("a")
    return number


def _natural(path: Path) -> list:
    """Sort key putting `part_2` before `part_10`."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", str(path))]


def archive_sets(files: list[Path]) -> list[ArchiveSet]:
    """Group archive files into sets (the parts of one split archive together), checking no part is missing;
    the sets in natural order of their names."""
    groups: dict[Path, list[tuple[str | None, Path]]] = defaultdict(list)
    for file in dict.fromkeys(Path(os.path.abspath(f)) for f in files):
        match = ARCHIVE_NAME.match(file.name)
        groups[file.parent / match["base"]].append((match["part"], file))
    sets = []
    for base, members in sorted(groups.items(), key=lambda group: _natural(group[0])):
        whole = [f for part, f in members if part is None]
        parts = sorted(((part, f) for part, f in members if part is not None), key=lambda pf: _part_number(pf[0]))
        if whole and parts:
            raise DataError(f"{base} exists both whole and as parts ({parts[0][1].name}, ...): remove one of them "
                            "(the parts concatenated in order are the whole archive).")
        if whole:
            sets.append(ArchiveSet(str(base), whole))
            continue
        numbers = [_part_number(p) for p, _ in parts]
        missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
        if missing or numbers[0] > 1:
            width = len(parts[0][0])
            shown = ", ".join(str(n).zfill(width) for n in missing[:5]) if missing else f"before {parts[0][0]}"
            raise DataError(f"{base}: part(s) {shown} missing ({len(parts)} parts found, {parts[0][1].name} to "
                            f"{parts[-1][1].name}); download them and rerun.")
        empty = [f for _, f in parts if f.stat().st_size == 0]
        if empty:
            raise DataError(f"{empty[0]} is empty (0 bytes): the download of this part did not finish; download "
                            "it again and rerun.")
        sets.append(ArchiveSet(str(base), [f for _, f in parts]))
    return sets


class PartsReader(io.RawIOBase):
    """The parts of a split archive as one stream, read front to back."""

    def __init__(self, parts: list[Path]):
        super().__init__()
        self.parts, self.index, self.position = parts, 0, 0
        self._file = None

    def readable(self) -> bool:
        return True

    @property
    def part(self) -> Path:
        return self.parts[min(self.index, len(self.parts) - 1)]

    def readinto(self, buffer) -> int:
        while self.index < len(self.parts):
            if self._file is None:
                self._file = open(self.parts[self.index], "rb")
            count = self._file.readinto(buffer)
            if count:
                self.position += count
                return count
            self._file.close()
            self._file, self.index = None, self.index + 1
        return 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def _members(archive: ArchiveSet, read: Callable[[str], bool], on_bytes: Callable[[int], None]
             ) -> Iterator[tuple[str, int, bytes | None]]:
    """(name, size, data if `read(name)` else None) of every regular file of `archive`, in archive order.

    A single plain tar is opened seekable (members not wanted are skipped by seeking); anything else is
    a stream, gzip decoded by `gzip.GzipFile`, which checks the stream's CRC (tarfile's own gzip reader
    does not). Damage anywhere becomes one DataError naming the archive, the part and the last member."""
    reader = None
    if len(archive.parts) == 1 and not archive.gzip:
        tar = tarfile.open(archive.parts[0], "r:")
        position = lambda: tar.offset  # noqa: E731
    else:
        reader = PartsReader(archive.parts)
        stream = io.BufferedReader(reader, 1 << 20)
        tar = tarfile.open(fileobj=gzip.GzipFile(fileobj=stream) if archive.gzip else stream, mode="r|")
        position = lambda: reader.position  # noqa: E731
    last, reported = "(none: the archive's start)", 0
    try:
        with tar:
            for info in tar:
                if info.isreg():
                    name = member_name(info.name)
                    yield name, info.size, tar.extractfile(info).read() if read(name) else None
                    last = name
                now = position()
                on_bytes(now - reported)
                reported = now
            if not _rest_is_padding(tar, seekable=reader is None):
                raise tarfile.ReadError(f"unreadable member header at byte {tar.offset} of the tar")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        where = f"part {reader.part} near byte {reader.position}" if reader else f"{archive.parts[0]}"
        raise DataError(f"{archive.name}: cannot read the archive ({type(err).__name__}: {err}) in {where}, after "
                        f"member {last}. The download is incomplete or corrupted: download the archive (or that "
                        "part) again and rerun; finished shards are kept.") from None
    finally:
        if reader is not None:
            reader.close()


def _rest_is_padding(tar: tarfile.TarFile, seekable: bool) -> bool:
    """tarfile ends its member list quietly at a damaged header: only zeros may follow the last member."""
    if seekable:
        tar.fileobj.seek(tar.offset)
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):
            return False
    return True


@dataclasses.dataclass
class MemberIndex:
    """Every regular file of the archives, numbered across them in reading order."""

    archives: list[ArchiveSet]
    names: list[str]
    sizes: list[int]
    lookup: list[dict[str, int]]  # per archive: member name -> number
    metadata: list[tuple[int, str, bytes]]  # (archive, member, bytes) of the members read as metadata
    starts: list[int]  # per archive: the number of its first member

    def find(self, name: str, archives: list[int] | None = None) -> int | None:
        for a in range(len(self.archives)) if archives is None else archives:
            number = self.lookup[a].get(name)
            if number is not None:
                return number
        return None


def index_archives(archives: list[ArchiveSet], is_metadata: Callable[[str], bool],
                   on_bytes: Callable[[int], None] = lambda n: None) -> MemberIndex:
    """First read: names and sizes of every member, and the bytes of the metadata members."""
    names, sizes, lookup, metadata, starts = [], [], [], [], []
    for a, archive in enumerate(archives):
        table = {}
        starts.append(len(names))
        for name, size, data in _members(archive, is_metadata, on_bytes):
            table[name] = len(names)  # a name stored twice: the later copy wins, as when tar extracts
            names.append(name)
            sizes.append(size)
            if data is not None:
                metadata.append((a, name, data))
        lookup.append(table)
    return MemberIndex(archives, names, sizes, lookup, metadata, starts)


class HeldMembers:
    """Members read before the records that need them are complete: in memory up to `budget` bytes, the
    rest in `scratch` files. With `scratch=None` only sizes are tracked (to predict the peaks)."""

    def __init__(self, budget: int, scratch: Path | None):
        self.budget, self.scratch = budget, scratch
        self.memory: dict[int, bytes | int] = {}
        self.spilled: dict[int, int] = {}
        self._heap: list[tuple[int, int]] = []  # (-release, member) of members in memory
        self.in_memory = self.on_disk = self.peak_memory = self.peak_disk = 0

    def put(self, number: int, data: bytes | int, release: int) -> None:
        self.memory[number] = data
        self.in_memory += data if isinstance(data, int) else len(data)
        heapq.heappush(self._heap, (-release, number))
        while self.in_memory > self.budget:
            _, victim = heapq.heappop(self._heap)
            if victim in self.memory:  # else dropped since: a stale entry
                self._spill(victim)
        if len(self._heap) > 2 * len(self.memory) + 1024:  # forget stale entries
            self._heap = [entry for entry in self._heap if entry[1] in self.memory]
            heapq.heapify(self._heap)
        self.peak_memory = max(self.peak_memory, self.in_memory)

    def _spill(self, number: int) -> None:
        data = self.memory.pop(number)
        size = data if isinstance(data, int) else len(data)
        if self.scratch is not None:
            self.scratch.mkdir(parents=True, exist_ok=True)
            (self.scratch / str(number)).write_bytes(data)
        self.spilled[number] = size
        self.in_memory -= size
        self.on_disk += size
        self.peak_disk = max(self.peak_disk, self.on_disk)

    def get(self, number: int) -> bytes:
        if number in self.memory:
            return self.memory[number]
        return (self.scratch / str(number)).read_bytes()

    def drop(self, number: int) -> None:
        if number in self.memory:
            data = self.memory.pop(number)
            self.in_memory -= data if isinstance(data, int) else len(data)
        elif number in self.spilled:
            self.on_disk -= self.spilled.pop(number)
            if self.scratch is not None:
                (self.scratch / str(number)).unlink()


@dataclasses.dataclass
class Timeline:
    """When each pending record becomes complete and when each member it needs can be let go."""

    immediate: list  # records needing no archive member
    complete_at: dict[int, list]  # member number -> records complete once it has been read
    release: dict[int, int]  # member number -> the member after which no pending record needs it

    @classmethod
    def of(cls, records: list, members_of: Callable) -> "Timeline":
        immediate, complete_at, release = [], defaultdict(list), {}
        for record in records:
            members = members_of(record)
            if not members:
                immediate.append(record)
                continue
            ready = max(members)
            complete_at[ready].append(record)
            for m in members:
                release[m] = max(release.get(m, -1), ready)
        return cls(immediate, complete_at, release)

    def drops(self) -> dict[int, list[int]]:
        at = defaultdict(list)
        for member, release in self.release.items():
            if release != member:  # members used at once are never held
                at[release].append(member)
        return at


def completion_order(records: list, members_of: Callable) -> list:
    """Records in the order the second read completes them (records needing no member first), stable."""
    return sorted(records, key=lambda r: max(members_of(r), default=-1))


def peak_hold(index: MemberIndex, timeline: Timeline, budget: int) -> tuple[int, int]:
    """(peak bytes in memory, peak bytes in scratch) that `Assembly.records` will hold for this timeline."""
    held, drops = HeldMembers(budget, None), timeline.drops()
    for member in sorted(timeline.release):
        if timeline.release[member] != member:
            held.put(member, index.sizes[member], timeline.release[member])
        for m in drops.get(member, ()):
            held.drop(m)
    return held.peak_memory, held.peak_disk


class Assembly:
    """Second read: the records of `timeline` in completion order, each passed through `attach(record,
    member -> bytes)` once its members have been read. `scratch` is created when the first member spills
    and removed when the read ends; `peak_memory`/`peak_disk` are what it held."""

    def __init__(self, index: MemberIndex, timeline: Timeline, budget: int, scratch: Path):
        self.index, self.timeline, self.budget, self.scratch = index, timeline, budget, scratch
        self.peak_memory = self.peak_disk = 0

    def records(self, attach: Callable, on_bytes: Callable[[int], None] = lambda n: None) -> Iterator:
        timeline, index = self.timeline, self.index
        yield from timeline.immediate
        if not timeline.release:
            return
        last, drops = max(timeline.release), timeline.drops()
        needed = sorted(timeline.release)
        held = HeldMembers(self.budget, self.scratch)
        try:
            for a, archive in enumerate(index.archives):
                number = index.starts[a]
                end = index.starts[a + 1] if a + 1 < len(index.archives) else len(index.names)
                if bisect.bisect_left(needed, number) == bisect.bisect_left(needed, end):
                    on_bytes(archive.size)  # nothing needed from this archive (done by an earlier run): not read
                    continue
                for name, _, data in _members(archive, lambda _: number in timeline.release, on_bytes):
                    if name != index.names[number]:
                        raise DataError(f"{archive.name}: member {number} is {name}, not {index.names[number]} as "
                                        "when the archive was first read: it changed during conversion; rerun.")
                    if data is not None:
                        if timeline.release[number] != number:  # needed again later: hold it
                            held.put(number, data, timeline.release[number])
                        for record in timeline.complete_at.get(number, ()):
                            yield attach(record, lambda m, n=number, d=data: d if m == n else held.get(m))
                        for m in drops.get(number, ()):
                            held.drop(m)
                    number += 1
                    if number > last:
                        return
        finally:
            self.peak_memory, self.peak_disk = held.peak_memory, held.peak_disk
            shutil.rmtree(self.scratch, ignore_errors=True)


def parse_size(text: str) -> int:
    """`512M`, `4G`, `4GiB`, `1.5g` or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise DataError(f"--memory-budget {text!r}: expected a size such as 512M, 4G or 4GiB.")
    return int(float(match[1]) * 1024 ** " kmgt".index((match[2] or " ").lower()))
