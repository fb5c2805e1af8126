"""OCI image layout: ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``.

The root of resumer is itself an OCI image layout, so skopeo, containerd and podman can
read what resumer pulled (``skopeo copy oci:ROOT:TAG …``). Several images share one
layout and its blobs; each image is one entry of ``index.json`` named by the
``org.opencontainers.image.ref.name`` annotation (the tag), with the full reference in
``io.containerd.image.name``.

``Layout`` owns ``oci-layout``, ``index.json`` and the names in it. It writes no blob
itself: ``layout.content`` (a ``ContentStore``, ``resumer/content/blobs.py``) is the one
door into ``blobs/``, for the root's own blobs and for a ``--dest`` layout alike.

Durability, as in the content store's commit: index.json changes only by an atomic rename
of a complete, fsynced temp file in the same directory, followed by an fsync of that
directory. Readers therefore see the old file or the new one, never a torn one. Temp
files start with ``.`` and end with ``.tmp``; readers never look at them, and ``ensure()``
removes the ones a crash left behind long ago.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .content.blobs import (
    STALE_TMP_SECONDS,
    ContentStore,
    create_temp,
    fsync_dir,
    make_dirs,
    remove_stale_temps,
    write_atomic,
)
from .digest import Digest
from .errors import StoreError, disk_error

LAYOUT_VERSION = "1.0.0"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
IMAGE_NAME = "io.containerd.image.name"

# One lock per (event loop, layout directory): two Layout objects on the same path must
# still serialise their index.json updates, and an asyncio.Lock must not cross loops.
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _index_lock(path: Path) -> asyncio.Lock:
    per_loop = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(path, asyncio.Lock())


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
        #: the one door into blobs/: every blob written here goes through it
        self.content = ContentStore(self.blobs_dir)

    def __repr__(self) -> str:
        return f"Layout({str(self.path)!r})"

    # ------------------------------------------------------------------ setup

    def ensure(self) -> None:
        """Create the layout files that are missing; clean up old crash debris.

        Synchronous and cheap (a few mkdir/stat calls); async callers may still prefer
        ``await asyncio.to_thread(layout.ensure)``.
        """
        try:
            self.content.ensure()  # blobs/sha256/, and the layout directory above it
            if not self.oci_layout_path.exists():
                write_atomic(
                    self.oci_layout_path,
                    json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode(),
                )
            if not self.index_path.exists():
                write_atomic(self.index_path, _dump_index(_empty_index()))
            remove_stale_temps(self.path)
        except OSError as exc:
            raise disk_error(f"cannot create OCI layout at {self.path}", exc) from exc

    # ------------------------------------------------------------------ blobs: the store's

    def blob_path(self, digest: str) -> Path:
        """Where the blob lives; the digest is validated, so no path escapes the layout."""
        return self.content.path(digest)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        return self.content.has(digest, size)

    async def add_blob_bytes(self, data: bytes, digest: str | None = None) -> str:
        """``content.commit_bytes``: a config or manifest, verified, committed."""
        return await self.content.commit_bytes(data, digest)

    async def link_blob_from(self, src: Path, digest: str) -> Path:
        """``content.import_verified``: another store's committed blob, linked or copied."""
        return await self.content.import_verified(src, digest)

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
            write_atomic(self.index_path, _dump_index(index))
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


__all__ = [
    "IMAGE_NAME",
    "REF_NAME",
    "STALE_TMP_SECONDS",
    "ImageEntry",
    "Layout",
    "create_temp",
    "fsync_dir",
    "make_dirs",
]
