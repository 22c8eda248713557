"""Streaming FASTA reading: any fsspec URL, plain, gzip (multi-member and bgzip included) or an
NCBI Datasets genome zip, normalised per Contract 1 into token ids.

Everything works on whole buffers of about 16 MiB: headers are found with `bytes.find`,
sequence text becomes token ids with one `bytes.translate`, and only a block with something
unusual in it (stray carriage returns, trailing blanks, a bad character) takes a slower path.
Line numbers are needed only in error messages, so they are computed only then, by reading
the input again up to the offending byte.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from isal import isal_zlib

from jobs.common import storage
from jobs.common.errors import BadInput
from model.vocab import ENCODE_TABLE, INVALID

BLOCK_BYTES = 16 << 20  # decompressed bytes parsed at a time
# Smaller pieces (bgzip members) are gathered up to this. At most what one read of a plain gzip
# member inflates to (~3 MB from READ_BYTES), so that those pieces are parsed as they come, not copied
# into a joined block: the join was 6 % of a tokenise worker's time.
MIN_BLOCK_BYTES = 1 << 20
READ_BYTES = 1 << 20  # compressed bytes read at a time: a corrupt stream loses at most one read's text
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
INVALID_BYTE = bytes([INVALID])
EMPTY = np.empty(0, dtype=np.uint8)
# Blanks and carriage returns at the end of a line are tolerated; anywhere else they are errors.
_TRAILING_BLANKS = re.compile(rb"[ \t\r]+(?=\n|\Z)")

MemberPicker = Callable[[list[str]], str]
_CURRENT = object()  # `error(record=...)` default: the record being read


class InputError(BadInput):
    """An input that cannot be used; the message names the file, and the record and line when known."""

    def __init__(self, source: str, problem: str, record: str | None = None, line: int | None = None):
        where = source + (f", record {record!r}" if record is not None else "") + (f", line {line}" if line else "")
        super().__init__(f"{where}: {problem}")
        self.source, self.problem, self.record, self.line = source, problem, record, line

    def __reduce__(self):  # keep the fields when Ray ships the error from a worker to the driver
        return InputError, (self.source, self.problem, self.record, self.line)


class CorruptInput(Exception):
    """Compressed data that does not decompress; the parser adds the record and line."""


class Source:
    """One input file, decompressed on the fly. `chunks()` opens it afresh on every call.

    The format is told by content, not by name: gzip magic, zip magic, else plain text. A zip
    must be an NCBI Datasets package; `pick_member` chooses the file inside it.
    """

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, pick_member: MemberPicker | None = None):
        self.url, self.options, self.pick_member = url, options, pick_member
        self.member: str | None = None
        self.size_bytes: int | None = None  # of the file as stored, known once it has been read through

    @property
    def name(self) -> str:
        return f"{self.url} [{self.member}]" if self.member else self.url

    def chunks(self) -> Iterator[bytes]:
        with storage.open_url(self.url, "rb", self.options) as raw:
            head = raw.read(4)
            if head.startswith(GZIP_MAGIC):
                yield from _gunzip(head, raw)
            elif head == ZIP_MAGIC:
                yield from self._unzip(raw)
                return
            else:
                yield head
                yield from iter(lambda: raw.read(BLOCK_BYTES), b"")
            self.size_bytes = raw.tell()

    def _unzip(self, raw) -> Iterator[bytes]:
        if self.pick_member is None:
            raise CorruptInput("is a zip archive; only NCBI Datasets genome packages are read")
        fs, path = storage.filesystem(self.url, self.options)
        with contextlib.ExitStack() as stack:
            if storage.is_local(fs):
                raw.seek(0)
                archive_file = raw
            else:  # zip needs random access: fetch remote packages to local disk first
                local = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "package.zip")
                fs.get(path, local)
                archive_file = stack.enter_context(open(local, "rb"))
            try:
                archive = stack.enter_context(zipfile.ZipFile(archive_file))
                self.member = self.pick_member(archive.namelist())
                member = stack.enter_context(archive.open(self.member))
                yield from iter(lambda: member.read(BLOCK_BYTES), b"")
            except (zipfile.BadZipFile, zlib.error, EOFError) as error:
                raise CorruptInput(f"corrupt zip archive ({error})") from None
            self.size_bytes = archive_file.seek(0, os.SEEK_END)


def ncbi_member(accession: str, annotation: bool = False) -> MemberPicker:
    """Choose the genome FASTA (or the annotation) of `accession` inside an NCBI Datasets package:
    ncbi_dataset/data/<accession>/<accession>_<name>_genomic.fna and .../genomic.gff (or .gtf).
    A package holding a single assembly is read whatever its folder is called."""

    def pick(names: list[str]) -> str:
        inside = [name.split("/") for name in names if name.startswith("ncbi_dataset/data/")]
        folders = sorted({parts[2] for parts in inside if len(parts) == 4})
        folder = accession if accession in folders else folders[0] if len(folders) == 1 else None
        if folder is None:
            raise CorruptInput(f"is not an NCBI Datasets genome package of {accession} (assembly folders: {folders})")
        prefix = f"ncbi_dataset/data/{folder}/"
        if annotation:
            wanted = [prefix + "genomic.gff", prefix + "genomic.gtf"]
            found = [name for name in wanted if name in names][:1]
        else:
            found = [name for name in names if name.startswith(f"{prefix}{folder}_") and name.endswith("_genomic.fna")]
        if len(found) != 1:
            kind = "annotation (genomic.gff or genomic.gtf)" if annotation else "genome FASTA (*_genomic.fna)"
            raise CorruptInput(f"expected one {kind} under {prefix}, found {found or 'none'}")
        return found[0]

    return pick


def _gunzip(head: bytes, raw) -> Iterator[bytes]:
    """Decompress a gzip stream of any number of members (multi-member files, bgzip blocks).

    ISA-L's zlib-compatible inflate, not CPython's zlib: it decompresses the same streams about 2.3x
    faster (benchmarks/tokenize_throughput.py), and decompression was three quarters of reading a
    gzipped genome. It checks each member's CRC and length itself; a stream that stops inside a
    member is reported as truncated.
    """
    decompressor = isal_zlib.decompressobj(31)
    data = head
    while True:
        if not data:
            data = raw.read(READ_BYTES)
            if not data:
                break
        if decompressor.eof:
            if data[0] == 0 and not data.strip(b"\0"):  # zero padding after the last member
                data = b""
                continue
            decompressor = isal_zlib.decompressobj(31)
        try:
            out = decompressor.decompress(data, BLOCK_BYTES)
        except isal_zlib.error as error:
            raise CorruptInput(f"corrupt gzip data ({error})") from None
        if out:
            yield out
        data = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
    if not decompressor.eof:
        raise CorruptInput("gzip stream is truncated")


def _next_header(text: bytes, position: int, end: int, at_line_start: bool) -> int:
    """Offset of the next '>' that starts a line, or -1. A '>' inside a line is left in the
    sequence, where it is reported as an invalid character."""
    found = text.find(b">", position, end)
    while found >= 0 and not (text[found - 1] == 0x0A if found > 0 else at_line_start):
        found = text.find(b">", found + 1, end)
    return found


def _safe_end(text: bytes) -> int:
    """Where a block can be cut: before a last line that holds a '>' (a header may go on in the
    next block) and before trailing blanks."""
    line_start = text.rfind(b"\n") + 1
    if text.find(b">", line_start) >= 0:
        return line_start
    end = len(text)
    while end > line_start and text[end - 1] in b" \t\r":
        end -= 1
    return end


def read_fasta(source: Source) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (record name, token ids) pieces. Every record starts with one empty piece, so an
    empty record is still seen; a record's other pieces follow in order."""
    return _Parser(source).pieces()


class _Parser:
    def __init__(self, source: Source):
        self.source = source
        self.record: str | None = None
        self.header_offsets: dict[str, int] = {}

    def pieces(self) -> Iterator[tuple[str, np.ndarray]]:
        # Blocks are parsed where they end, mid-line or not: sequence needs no line structure.
        # Only a header line cut by the block end, or blanks at its end (which may yet turn out
        # to end a line), are held back and parsed with the next block.
        carry = b""
        start = 0  # stream offset of the text being parsed
        at_line_start = True
        for block, final in self._blocks():
            text = carry + block if carry else block
            end = len(text) if final else _safe_end(text)
            yield from self._parse(text, end, start, at_line_start)
            if end:
                at_line_start = text[end - 1] == 0x0A
            carry, start = text[end:], start + end
        if not self.header_offsets:
            raise InputError(self.source.name, "no FASTA records found (empty input)")

    def _blocks(self) -> Iterator[tuple[bytes, bool]]:
        """Decompressed data in blocks of at least MIN_BLOCK_BYTES (bgzip members are tiny); the last flagged final."""
        pending: list[bytes] = []
        size = received = 0
        chunks = self.source.chunks()
        while True:
            try:
                chunk = next(chunks, None)
            except CorruptInput as error:
                # Parse what was readable, so that the error names the record and line where it ends.
                yield b"".join(pending), True
                raise self.error(str(error), received) from None
            if chunk is None:
                break
            pending.append(chunk)
            size += len(chunk)
            received += len(chunk)
            if size >= MIN_BLOCK_BYTES:
                yield b"".join(pending), False
                pending, size = [], 0
        yield b"".join(pending), True

    def _parse(self, text: bytes, end: int, start: int, at_line_start: bool) -> Iterator[tuple[str, np.ndarray]]:
        position = 0
        while position < end:
            if at_line_start and text[position] == 0x3E:  # '>'
                line_end = text.find(b"\n", position, end)
                line_end = end if line_end < 0 else line_end
                self._header(text[position + 1 : line_end], start + position)
                yield self.record, EMPTY
                position = line_end + 1
                continue
            header = _next_header(text, position, end, at_line_start)
            segment_end = end if header < 0 else header
            ids = self._sequence(text[position:segment_end], start + position)
            if ids.size:
                yield self.record, ids
            position, at_line_start = segment_end, True

    def _header(self, header: bytes, offset: int) -> None:
        fields = header.split(None, 1)
        if not fields:
            raise self.error("header line has no sequence name", offset, record=None)
        name = fields[0].decode("utf-8", errors="replace")
        if name in self.header_offsets:
            first = self.line_at(self.header_offsets[name])
            raise self.error(f"contig name repeated in this assembly (first at line {first})", offset, record=name)
        self.header_offsets[name] = offset
        self.record = name

    def _sequence(self, segment: bytes, offset: int) -> np.ndarray:
        if self.record is None:
            stripped = segment.lstrip()
            if not stripped:
                return EMPTY  # blank lines before the first header
            where = offset + len(segment) - len(stripped)
            if stripped.startswith(b"@"):
                raise self.error("not a FASTA file: the first record starts with '@' (FASTQ?)", where)
            raise self.error("not a FASTA file: sequence line before any '>' header", where)
        # Fast path: CRLF line ends (every CR followed by LF) are deleted with the newlines.
        crlf = b"\r" in segment and segment.count(b"\r") == segment.count(b"\r\n")
        encoded = segment.translate(ENCODE_TABLE, b"\r\n" if crlf else b"\n")
        if INVALID_BYTE in encoded:
            encoded = self._sequence_slowly(segment, offset)
        return np.frombuffer(encoded, dtype=np.uint8)

    def _sequence_slowly(self, segment: bytes, offset: int) -> bytes:
        """Tolerate blanks and CRs at line ends; report the first other bad character."""
        encoded = _TRAILING_BLANKS.sub(b"", segment).translate(ENCODE_TABLE, b"\n")
        if INVALID_BYTE not in encoded:
            return encoded
        line_offset = 0
        for line in segment.split(b"\n"):
            content = line.rstrip(b" \t\r")
            bad = content.translate(ENCODE_TABLE).find(INVALID_BYTE)
            if bad >= 0:
                raise self.error(f"invalid character {chr(content[bad])!r} in a sequence line", offset + line_offset)
            line_offset += len(line) + 1
        raise self.error("invalid character in a sequence line", offset)

    def line_at(self, offset: int) -> int:
        """1-based line number of a stream offset, by reading the input again up to it."""
        newlines = 0
        with contextlib.suppress(CorruptInput):
            for chunk in self.source.chunks():
                if offset < len(chunk):
                    return newlines + chunk.count(b"\n", 0, offset) + 1
                newlines += chunk.count(b"\n")
                offset -= len(chunk)
        return newlines + 1

    def error(self, problem: str, offset: int, record: Any = _CURRENT) -> InputError:
        record = self.record if record is _CURRENT else record
        return InputError(self.source.name, problem, record, self.line_at(offset))
