"""OCI image layout: ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``.

The root of resumer is itself an OCI image layout, so skopeo, containerd and podman can
read what resumer pulled (``skopeo copy oci:ROOT:TAG …``). Several images share one
layout and its blobs; each image is one entry of ``index.json`` named by the
``org.opencontainers.image.ref.name`` annotation (the tag), with the full reference in
``io.containerd.image.name``.

Durability, as in the ingest store's commit: a blob or index becomes visible only by an
atomic rename of a complete, fsynced temp file in the same directory, followed by an
fsync of that directory. Readers therefore see the old file or the new one, never a torn
one. Temp files start with ``.`` and end with ``.tmp``; readers never look at them, and
``ensure()`` removes the ones a crash left behind long ago.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .digest import Digest
from .errors import DigestMismatchError, StoreError, disk_error

LAYOUT_VERSION = "1.0.0"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
IMAGE_NAME = "io.containerd.image.name"

#: Temp files older than this are debris from a crash, not a write in progress.
STALE_TMP_SECONDS = 3600.0
_TMP_SUFFIX = ".tmp"
_COPY_CHUNK = 1 << 20

# One lock per (event loop, layout directory): two Layout objects on the same path must
# still serialise their index.json updates, and an asyncio.Lock must not cross loops.
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _index_lock(path: Path) -> asyncio.Lock:
    per_loop = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(path, asyncio.Lock())


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new directories survive a power cut: each new one's parent is
    fsynced (a file later synced inside an unsynced directory is lost with it)."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(0o777)
        except FileExistsError:
            if not d.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(d)) from None
        fsync_dir(d.parent)


def create_temp(directory: Path, prefix: str, suffix: str = _TMP_SUFFIX) -> tuple[int, Path]:
    """A new file ``directory/PREFIX<random>SUFFIX`` open for writing, like ``mkstemp``
    but with the mode ``open()`` gives (0o666 & ~umask, so 0644 for umask 022), not 0600:
    what is renamed into a layout must be readable by another user's skopeo or podman."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        path = directory / f"{prefix}{os.urandom(6).hex()}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(directory))


def _write_atomic(dest: Path, data: bytes) -> None:
    """Temp file in dest's directory, fsync, rename over dest, fsync the directory."""
    fd, tmp = create_temp(dest.parent, f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def _write_blob(dest: Path, data: bytes) -> None:
    if not dest.exists():  # content-addressed: an existing blob is this very content
        _write_atomic(dest, data)


@dataclass(frozen=True)
class ImageEntry:
    """One image recorded in index.json."""

    ref_name: str | None  # the tag, as skopeo's oci:DIR:TAG looks it up
    image_name: str | None  # the full reference, as containerd names it
    digest: str
    media_type: str
    size: int
    descriptor: dict[str, Any]


class Layout:
    """An OCI image layout directory shared by several images."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).absolute()
        self.blobs_dir = self.path / "blobs" / "sha256"
        self.index_path = self.path / "index.json"
        self.oci_layout_path = self.path / "oci-layout"

    def __repr__(self) -> str:
        return f"Layout({str(self.path)!r})"

    # ------------------------------------------------------------------ setup

    def ensure(self) -> None:
        """Create the layout files that are missing; clean up old crash debris.

        Synchronous and cheap (a few mkdir/stat calls); async callers may still prefer
        ``await asyncio.to_thread(layout.ensure)``.
        """
        try:
            make_dirs(self.blobs_dir)
            if not self.oci_layout_path.exists():
                _write_atomic(
                    self.oci_layout_path,
                    json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode(),
                )
            if not self.index_path.exists():
                _write_atomic(self.index_path, _dump_index(_empty_index()))
            self._remove_stale_tmp(self.path)
            self._remove_stale_tmp(self.blobs_dir)
        except OSError as exc:
            raise disk_error(f"cannot create OCI layout at {self.path}", exc) from exc

    def _remove_stale_tmp(self, directory: Path, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for p in directory.glob(f".*{_TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    p.unlink()

    # ------------------------------------------------------------------ blobs

    def blob_path(self, digest: str) -> Path:
        """Where the blob lives; the digest is validated, so no path escapes the layout."""
        return self.blobs_dir / Digest.parse(digest).hex

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    async def add_blob_bytes(self, data: bytes, digest: str | None = None) -> str:
        """Store a small blob (config, manifest); verify ``digest`` if given; return it."""
        actual = Digest.of(data)
        if digest is not None and Digest.parse(digest) != actual:
            raise DigestMismatchError(
                f"blob {digest}: content hashes to {actual}, refusing to store it",
                resumed=False,
            )
        dest = self.blob_path(str(actual))
        try:
            await asyncio.to_thread(_write_blob, dest, data)
        except OSError as exc:
            raise disk_error(f"cannot write blob {actual} to {self.blobs_dir}", exc) from exc
        return str(actual)

    async def link_blob_from(self, src: Path, digest: str) -> Path:
        """Make the committed blob ``src`` visible here as ``digest``.

        ``src`` must be a committed (verified) blob. On the same filesystem it is
        hardlinked, which costs no copy. Across filesystems it is copied through a temp
        file and hashed on the way, since a copy is a new chance for corruption.
        """
        dest = self.blob_path(digest)
        try:
            await asyncio.to_thread(self._link_or_copy, Path(src), dest, digest)
        except OSError as exc:
            raise disk_error(f"cannot add blob {digest} from {src} to {self.path}", exc) from exc
        return dest

    def _link_or_copy(self, src: Path, dest: Path, digest: str) -> None:
        try:
            os.link(src, dest)
        except FileExistsError:
            return  # renamed in only when complete, so an existing blob is whole
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            self._copy_verified(src, dest, digest)
            return
        fsync_dir(dest.parent)

    def _copy_verified(self, src: Path, dest: Path, digest: str) -> None:
        if dest.exists():
            return
        want = Digest.parse(digest)
        h = hashlib.sha256()
        fd, tmp = create_temp(dest.parent, f".{want.hex}.")
        try:
            with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
                while block := fin.read(_COPY_CHUNK):
                    h.update(block)
                    fout.write(block)
                fout.flush()
                os.fsync(fout.fileno())
            if h.hexdigest() != want.hex:
                raise DigestMismatchError(
                    f"blob {digest}: copy of {src} hashes to sha256:{h.hexdigest()}",
                    resumed=False,
                )
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)

    # ------------------------------------------------------------------ index

    def read_index(self) -> dict[str, Any]:
        """index.json as a dict; ``StoreError`` naming the file if it is unusable."""
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return _empty_index()
        except OSError as exc:
            raise StoreError(f"cannot read {self.index_path}: {exc}") from exc
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"corrupt {self.index_path}: not valid JSON ({exc})") from exc
        _check_index(doc, self.index_path)
        return dict(doc)

    def images(self) -> list[ImageEntry]:
        """Every image in index.json, in file order."""
        out: list[ImageEntry] = []
        for m in self.read_index()["manifests"]:
            ann = m.get("annotations") or {}
            out.append(
                ImageEntry(
                    ref_name=ann.get(REF_NAME),
                    image_name=ann.get(IMAGE_NAME),
                    digest=m["digest"],
                    media_type=m["mediaType"],
                    size=m["size"],
                    descriptor=m,
                )
            )
        return out

    async def add_image(
        self, descriptor: dict[str, Any], *, ref_name: str, image_name: str
    ) -> None:
        """Record a manifest or index descriptor named ``image_name`` (tag ``ref_name``).

        An entry for the same full image name is replaced; other images keep theirs even
        when they share the tag (``a/x:latest`` and ``b/y:latest`` live side by side).
        The manifest blob must already be here (``StoreError`` otherwise): an entry in
        index.json promises its content, so blobs are stored first, the entry last.
        """
        entry = _check_descriptor(descriptor)
        annotations = dict(entry.get("annotations") or {})
        annotations[REF_NAME] = ref_name
        annotations[IMAGE_NAME] = image_name
        entry["annotations"] = annotations
        async with _index_lock(self.path):
            await asyncio.to_thread(self._replace_entry, entry, ref_name, image_name)

    def _replace_entry(self, entry: dict[str, Any], ref_name: str, image_name: str) -> None:
        if not self.has_blob(entry["digest"], entry["size"]):
            raise StoreError(
                f"cannot tag {ref_name} in {self.path}: blob {entry['digest']} "
                f"({entry['size']} bytes) is not in the layout"
            )
        index = self.read_index()
        manifests = [m for m in index["manifests"] if not _names(m, ref_name, image_name)]
        manifests.append(entry)
        index["manifests"] = manifests
        try:
            _write_atomic(self.index_path, _dump_index(index))
        except OSError as exc:
            raise disk_error(f"cannot write {self.index_path}", exc) from exc


def _names(entry: dict[str, Any], ref_name: str, image_name: str) -> bool:
    """Whether ``entry`` is the one an image named ``image_name`` replaces.

    Entries written by others may lack the full name: then the tag decides, as before.
    """
    annotations = entry.get("annotations") or {}
    if IMAGE_NAME in annotations:
        return bool(annotations[IMAGE_NAME] == image_name)
    return bool(annotations.get(REF_NAME) == ref_name)


def _empty_index() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}


def _dump_index(index: dict[str, Any]) -> bytes:
    return json.dumps(index, indent=2).encode() + b"\n"


def _check_index(doc: Any, path: Path) -> None:
    if not isinstance(doc, dict):
        raise StoreError(f"corrupt {path}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("schemaVersion") != 2:
        raise StoreError(f"corrupt {path}: schemaVersion is {doc.get('schemaVersion')!r}, not 2")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise StoreError(f"corrupt {path}: 'manifests' is not a list")
    for i, m in enumerate(manifests):
        try:
            _check_descriptor(m)
        except ValueError as exc:
            raise StoreError(f"corrupt {path}: manifests[{i}]: {exc}") from exc
        if not isinstance(m.get("annotations", {}), dict):
            raise StoreError(f"corrupt {path}: manifests[{i}]: annotations is not an object")


def _check_descriptor(descriptor: Any) -> dict[str, Any]:
    """A copy of a valid descriptor, or ValueError saying what is wrong."""
    if not isinstance(descriptor, dict):
        raise ValueError("descriptor is not an object")
    media_type, digest, size = (descriptor.get(k) for k in ("mediaType", "digest", "size"))
    if not isinstance(media_type, str) or not media_type:
        raise ValueError("descriptor has no mediaType")
    if not isinstance(digest, str):
        raise ValueError("descriptor has no digest")
    try:
        Digest.parse(digest)
    except Exception as exc:
        raise ValueError(str(exc)) from exc
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"descriptor {digest} has no valid size")
    return dict(descriptor)


__all__ = ["IMAGE_NAME", "REF_NAME", "ImageEntry", "Layout"]
