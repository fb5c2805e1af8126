"""Layer registration helpers: the diffID of a committed blob, and chain IDs.

A layer's diffID is the sha256 of its *uncompressed* tar; the image config lists them,
and registration checks each committed blob against it. Computing it means inflating the
whole layer, which is the hot spot of registration, so gzip goes through isal (or
zlib-ng) when installed, with the standard zlib as the fallback.

Memory stays bounded whatever the layer: input is read 1 MiB at a time, and every
decompressor call is capped at 1 MiB of output, so a small blob that inflates to
terabytes (a decompression bomb) is stopped at ``max_uncompressed`` having used ~2 MiB.

The work is blocking; call ``compute_diff_id`` from async code, which runs
``diff_id_of`` in a thread (hashlib, isal and zstandard release the GIL).
"""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, ClassVar, Literal, cast

import zstandard

from .digest import chain_id
from .errors import RegistrationError

Compression = Literal["gzip", "zstd", "none"]

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _pick_inflater() -> tuple[str, Any, tuple[type[BaseException], ...]]:
    """The fastest available zlib-compatible module: isal, zlib-ng, then zlib."""
    try:
        from isal import isal_zlib

        return "isal", isal_zlib, (cast(type[BaseException], isal_zlib.error), zlib.error)
    except ImportError:  # pragma: no cover - depends on the platform's wheels
        pass
    try:  # pragma: no cover
        from zlib_ng import zlib_ng

        return "zlib-ng", zlib_ng, (cast(type[BaseException], zlib_ng.error), zlib.error)
    except ImportError:  # pragma: no cover
        return "zlib", zlib, (zlib.error,)


INFLATE_BACKEND, _inflate, _INFLATE_ERRORS = _pick_inflater()

# Media types whose compression is certain. Anything else (Docker's rootfs.diff.tar.gzip,
# which some tools also use for zstd, or a foreign type) is sniffed from its magic bytes.
_KNOWN: dict[str, Compression] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
}


class _Corrupt(Exception):
    """Internal: the compressed stream is malformed; the message says how."""


class _TooBig(Exception):
    """Internal: the uncompressed stream passed the limit."""


Emit = Callable[[bytes], object]


def compression_of(media_type: str, head: bytes) -> Compression:
    """The layer's compression: from an OCI media type, else from its first bytes."""
    known = _KNOWN.get(media_type)
    if known is not None:
        return known
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def _read_chunks(f: BinaryIO) -> Iterator[bytes]:
    while block := f.read(CHUNK):
        yield block


def _inflate_gzip(f: BinaryIO, emit: Emit) -> None:
    """Every member of a (possibly multi-member) gzip stream, ≤ 1 MiB of output per call."""
    d: Any = None  # the decompressor of the member in progress
    members = 0
    for block in _read_chunks(f):
        data = block
        while data:
            if d is None:
                if members:
                    # Zero padding after a member is allowed, as gzip(1) allows it.
                    data = data.lstrip(b"\0")
                    if not data:
                        break
                d = _inflate.decompressobj(wbits=31)
                members += 1
            # The output cap keeps a bomb from allocating gigabytes in one call; input
            # the cap left unprocessed waits in unconsumed_tail.
            emit(d.decompress(data, CHUNK))
            while d.unconsumed_tail:
                emit(d.decompress(d.unconsumed_tail, CHUNK))
            if d.eof:  # member done; whatever follows starts the next one
                data, d = d.unused_data, None
            else:
                data = b""
    if d is not None:
        emit(d.flush())
        if not d.eof:
            raise _Corrupt("truncated gzip stream")
    if members == 0:
        raise _Corrupt("empty gzip stream")


class _ZstdFrames:
    """Walks zstd frame and block headers to tell whether the stream ended cleanly.

    zstandard's streaming decompressors stop quietly at a truncated final frame, and a
    truncated layer must not pass. Only headers are parsed (one per ≤ 128 KiB block),
    so this costs next to nothing beside decompression.
    """

    def __init__(self) -> None:
        self._state = "magic"
        self._buf = b""
        self._skip = 0
        self._checksum = 0
        self.frames = 0

    _WANT: ClassVar[dict[str, int]] = {"magic": 4, "skippable": 4, "descriptor": 1, "block": 3}

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                continue
            want = self._WANT[self._state]
            take = min(want - len(self._buf), n - pos)
            self._buf += data[pos : pos + take]
            pos += take
            if len(self._buf) == want:
                header, self._buf = self._buf, b""
                self._advance(header)

    def _advance(self, h: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(h, "little")
            if h == ZSTD_MAGIC:
                self.frames += 1
                self._state = "descriptor"
            elif 0x184D2A50 <= magic <= 0x184D2A5F:
                self._state = "skippable"
            else:
                raise _Corrupt(f"unknown zstd frame magic {h.hex()}")
        elif self._state == "skippable":
            self._skip = int.from_bytes(h, "little")
            self._state = "magic"
        elif self._state == "descriptor":
            fhd = h[0]
            if fhd & 0x08:
                raise _Corrupt("reserved bit set in zstd frame header")
            single_segment = (fhd >> 5) & 1
            fcs = (1 if single_segment else 0, 2, 4, 8)[fhd >> 6]
            dictionary_id = (0, 1, 2, 4)[fhd & 3]
            self._skip = (0 if single_segment else 1) + dictionary_id + fcs
            self._checksum = 4 if fhd & 0x04 else 0
            self._state = "block"
        else:
            header = int.from_bytes(h, "little")
            block_type, size = (header >> 1) & 3, header >> 3
            if block_type == 3:
                raise _Corrupt("reserved zstd block type")
            self._skip = 1 if block_type == 1 else size  # an RLE block stores one byte
            if header & 1:  # last block: then the optional checksum, then a new frame
                self._skip += self._checksum
                self._state = "magic"

    def complete(self) -> bool:
        return self._state == "magic" and not self._buf and not self._skip


class _Sink:
    """File-like target for zstandard's stream_writer; output arrives ≤ 1 MiB a time."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit

    def write(self, data: bytes) -> int:
        self._emit(data)
        return len(data)


def _inflate_zstd(f: BinaryIO, emit: Emit) -> None:
    """All frames of a zstd stream, including frames that declare no content size."""
    frames = _ZstdFrames()
    dctx = zstandard.ZstdDecompressor()
    # stream_writer pushes output in write_size pieces, so memory is bounded even for
    # RLE blocks that inflate 128 KiB from 4 bytes (decompressobj has no output cap).
    with dctx.stream_writer(
        cast(IO[bytes], _Sink(emit)), write_size=CHUNK, closefd=False
    ) as writer:
        for block in _read_chunks(f):
            frames.feed(block)
            writer.write(block)
    if frames.frames == 0:
        raise _Corrupt("empty zstd stream")
    if not frames.complete():
        raise _Corrupt("truncated zstd stream")


def _copy(f: BinaryIO, emit: Emit) -> None:
    for block in _read_chunks(f):
        emit(block)


_DECODERS: dict[Compression, Callable[[BinaryIO, Emit], None]] = {
    "gzip": _inflate_gzip,
    "zstd": _inflate_zstd,
    "none": _copy,
}


def _layer_name(path: Path, digest: str | None) -> str:
    if digest:
        return f"layer {digest}"
    name = path.name
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return f"layer sha256:{name}"
    return f"layer {path}"


def diff_id_of(
    path: Path | str,
    media_type: str,
    *,
    max_uncompressed: int,
    digest: str | None = None,
) -> str:
    """sha256 of the uncompressed content of the blob at ``path``, as ``sha256:<hex>``.

    Blocking: run it in a thread (``compute_diff_id``). ``digest`` names the layer in
    errors (default: the file name, when it is a blob hex). Raises ``RegistrationError``
    for corrupt data, or when the content inflates beyond ``max_uncompressed`` bytes.
    """
    path = Path(path)
    name = _layer_name(path, digest)
    h = hashlib.sha256()
    total = 0
    compression: Compression = "none"

    def emit(out: bytes) -> None:
        nonlocal total
        total += len(out)
        if total > max_uncompressed:
            raise _TooBig
        h.update(out)

    try:
        with path.open("rb") as f:
            compression = compression_of(media_type, f.read(4))
            f.seek(0)
            _DECODERS[compression](f, emit)
    except _TooBig:
        raise RegistrationError(
            f"{name}: uncompressed size exceeds {max_uncompressed} bytes (decompression bomb?)"
        ) from None
    except _Corrupt as exc:
        raise RegistrationError(f"{name}: corrupt {compression} data: {exc}") from exc
    except _INFLATE_ERRORS as exc:
        raise RegistrationError(f"{name}: corrupt gzip data: {exc}") from exc
    except zstandard.ZstdError as exc:
        raise RegistrationError(f"{name}: corrupt zstd data: {exc}") from exc
    except OSError as exc:
        raise RegistrationError(f"{name}: cannot read {path}: {exc}") from exc
    return "sha256:" + h.hexdigest()


async def compute_diff_id(
    path: Path | str,
    media_type: str,
    *,
    max_uncompressed: int,
    digest: str | None = None,
) -> str:
    """``diff_id_of`` off the event loop."""
    return await asyncio.to_thread(
        diff_id_of, path, media_type, max_uncompressed=max_uncompressed, digest=digest
    )


async def verify_diff_id(
    path: Path | str,
    media_type: str,
    expected: str,
    *,
    max_uncompressed: int,
    digest: str | None = None,
) -> None:
    """``RegistrationError`` unless the blob's diffID is ``expected`` (from the config)."""
    actual = await compute_diff_id(
        path, media_type, max_uncompressed=max_uncompressed, digest=digest
    )
    if actual != expected:
        name = _layer_name(Path(path), digest)
        raise RegistrationError(f"{name}: diffID is {actual}, the image config says {expected}")


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain ID of every layer of a stack, bottom first."""
    out: list[str] = []
    parent: str | None = None
    for diff_id in diff_ids:
        parent = chain_id(parent, diff_id)
        out.append(parent)
    return out


__all__ = [
    "INFLATE_BACKEND",
    "chain_ids",
    "compression_of",
    "compute_diff_id",
    "diff_id_of",
    "verify_diff_id",
]
