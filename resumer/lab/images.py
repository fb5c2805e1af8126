"""Deterministic container images for tests, the demo and benchmarks.

An image is built from a seed: tar layers with either incompressible (random) or realistic
compressible (source-code-like) content, compressed as gzip, zstd or not at all, plus the
config, the manifest (OCI or Docker schema2) and optionally a multi-platform index.

Big blobs stay on disk (``Layer.path``), so a 200 MiB image costs little memory. Building
is synchronous CPU and file work; async callers should run it in a thread.

``write_oci_layout`` writes plain files on purpose rather than going through
``resumer.layout``: tests use it as an independent oracle for the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import zstandard

_fast_zlib: Any
try:  # isal is ~10x faster than zlib at building 100 MiB test layers.
    from isal import isal_zlib

    _fast_zlib, _GZIP_LEVEL = isal_zlib, 2
except ImportError:  # pragma: no cover - isal is not built for every platform
    _fast_zlib, _GZIP_LEVEL = zlib, 6

Compression = Literal["gzip", "zstd", "none"]
Flavour = Literal["oci", "docker"]

OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

REF_NAME = "org.opencontainers.image.ref.name"

_OCI_LAYER_TYPES: dict[Compression, str] = {
    "gzip": OCI_LAYER_GZIP,
    "zstd": OCI_LAYER_ZSTD,
    "none": OCI_LAYER,
}
_EPOCH = "1970-01-01T00:00:00Z"
_CHUNK = 1 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    def as_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True)
class LayerSpec:
    """What to generate. ``size`` is the approximate uncompressed payload in bytes."""

    size: int = 64 * 1024
    compression: Compression = "gzip"
    compressible: bool = True
    files: int = 4


@dataclass(frozen=True)
class Layer:
    """One built layer blob, kept on disk."""

    digest: str  # of the compressed blob, as in the manifest
    size: int  # of the compressed blob
    media_type: str
    diff_id: str  # sha256 of the uncompressed tar
    path: Path
    compression: Compression
    uncompressed_size: int

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass
class BuiltImage:
    """An image ready to push or write: blobs on disk, JSON documents in memory.

    For a multi-platform image, ``index`` is set, ``children`` holds one single-platform
    image per platform, and the manifest/config/layers fields mirror ``children[0]``.
    """

    layers: list[Layer]
    config: bytes
    config_digest: str
    config_media_type: str
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str
    platform: Platform
    index: bytes | None = None
    index_digest: str | None = None
    index_media_type: str | None = None
    children: list[BuiltImage] = field(default_factory=list)

    @property
    def digest(self) -> str:
        """The digest a tag points at: the index if there is one, else the manifest."""
        return self.index_digest or self.manifest_digest

    @property
    def media_type(self) -> str:
        return self.index_media_type or self.manifest_media_type

    @property
    def top(self) -> bytes:
        """The document a tag points at."""
        return self.index if self.index is not None else self.manifest

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.top)}

    def images(self) -> list[BuiltImage]:
        """Every single-platform image (itself when it has no index)."""
        return self.children if self.index is not None else [self]

    def blobs(self) -> Iterator[tuple[str, bytes | Path]]:
        """Every blob once, including manifests: (digest, bytes or path)."""
        seen: set[str] = set()
        for img in self.images():
            entries: list[tuple[str, bytes | Path]] = [(x.digest, x.path) for x in img.layers]
            entries += [(img.config_digest, img.config), (img.manifest_digest, img.manifest)]
            for d, content in entries:
                if d not in seen:
                    seen.add(d)
                    yield d, content
        if self.index is not None and self.index_digest is not None:
            yield self.index_digest, self.index

    def total_layer_bytes(self) -> int:
        unique = {layer.digest: layer.size for img in self.images() for layer in img.layers}
        return sum(unique.values())


# --------------------------------------------------------------------------- content


_WORD_TEXT = (
    "def class return self import from None True False if else elif for while in not and "
    "or try except finally with as yield async await lambda pass raise assert global "
    "value result data path name items index count config logger request response "
    "session buffer offset length digest layer chunk error status header token retry "
    "print len range list dict str int bytes open write read close append update "
)
_WORDS = _WORD_TEXT.split()
_PUNCT = ["(", ")", ":", ", ", " = ", ".", "[", "]", " + ", " == ", "_", "'", '"']


def _text_block(rng: random.Random, size: int) -> bytes:
    """Python-source-like text: indented lines of keywords, names and punctuation."""
    lines: list[str] = []
    n = 0
    while n < size:
        indent = "    " * rng.randrange(4)
        words = rng.choices(_WORDS, k=rng.randrange(2, 10))
        parts: list[str] = []
        for w in words:
            parts.append(w)
            parts.append(rng.choice(_PUNCT) if rng.random() < 0.4 else " ")
        if rng.random() < 0.2:  # numbers and identifiers keep entropy realistic
            parts.append(f"{rng.getrandbits(24):x}")
        line = indent + "".join(parts).rstrip() + "\n"
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()[:size]


class _Generator:
    """A deterministic byte stream of a given kind, produced in blocks."""

    def __init__(self, seed: int, compressible: bool) -> None:
        self._rng = random.Random(seed)
        self._compressible = compressible
        # A pool of text blocks, reused in random order with a random header line each:
        # generating every byte as fresh text would make 100 MiB layers take minutes.
        self._pool: list[bytes] = []
        if compressible:
            self._pool = [_text_block(self._rng, 16 * 1024) for _ in range(64)]

    def block(self, n: int) -> bytes:
        if not self._compressible:
            return self._rng.randbytes(n)
        out = bytearray()
        while len(out) < n:
            out += f"# {self._rng.getrandbits(64):016x}\n".encode()
            out += self._rng.choice(self._pool)
        return bytes(out[:n])


class _GenReader(io.RawIOBase):
    """A file-like view of ``size`` generated bytes, so tarfile can stream a big file."""

    def __init__(self, gen: _Generator, size: int) -> None:
        self._gen = gen
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        self._left -= n
        return self._gen.block(n) if n else b""


class _LayerWriter(io.RawIOBase):
    """What tarfile writes into: hashes the tar (diffID), compresses, hashes the blob."""

    def __init__(self, out: BinaryIO, compression: Compression) -> None:
        self._out = out
        self.diff_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.uncompressed = 0
        self.compressed = 0
        self._compress: Callable[[bytes], bytes]
        self._flush: Callable[[], bytes]
        if compression == "gzip":
            # wbits=31 makes a gzip container with mtime 0: byte-identical across runs.
            c = _fast_zlib.compressobj(_GZIP_LEVEL, _fast_zlib.DEFLATED, 31)
            self._compress, self._flush = c.compress, c.flush
        elif compression == "zstd":
            z = zstandard.ZstdCompressor(level=3).compressobj()
            self._compress, self._flush = z.compress, z.flush
        else:
            self._compress, self._flush = bytes, bytes

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        b = bytes(data)
        self.diff_hash.update(b)
        self.uncompressed += len(b)
        self._emit(self._compress(b))
        return len(b)

    def finish(self) -> None:
        self._emit(self._flush())

    def _emit(self, data: bytes) -> None:
        if data:
            self.blob_hash.update(data)
            self.compressed += len(data)
            self._out.write(data)


def _tarinfo(name: str, size: int, *, directory: bool = False) -> tarfile.TarInfo:
    # Fixed owner, mode and mtime: the same seed gives the same bytes on any machine.
    ti = tarfile.TarInfo(name)
    ti.size = 0 if directory else size
    ti.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    ti.mode = 0o755 if directory else 0o644
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def make_layer(workdir: Path | str, spec: LayerSpec, *, seed: int) -> Layer:
    """Generate one layer blob into ``workdir/blobs/`` and describe it."""
    blobs = Path(workdir) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".tmp-{seed}-{os.getpid()}-{random.Random().getrandbits(32):08x}"
    gen = _Generator(seed, spec.compressible)
    files = max(1, spec.files)
    per_file, rest = divmod(max(0, spec.size), files)
    with tmp.open("wb") as out:
        writer = _LayerWriter(out, spec.compression)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            top = f"lab-{seed:x}"
            tar.addfile(_tarinfo(top, 0, directory=True))
            for i in range(files):
                size = per_file + (rest if i == 0 else 0)
                name = f"{top}/file{i:03d}.py" if spec.compressible else f"{top}/file{i:03d}.bin"
                tar.addfile(_tarinfo(name, size), _GenReader(gen, size))
        writer.finish()
    digest = "sha256:" + writer.blob_hash.hexdigest()
    path = blobs / digest.removeprefix("sha256:")
    os.replace(tmp, path)
    return Layer(
        digest=digest,
        size=writer.compressed,
        media_type=_OCI_LAYER_TYPES[spec.compression],
        diff_id="sha256:" + writer.diff_hash.hexdigest(),
        path=path,
        compression=spec.compression,
        uncompressed_size=writer.uncompressed,
    )


def _dumps(doc: dict[str, Any]) -> bytes:
    # Compact and key-sorted, so the digest of a document depends only on its content.
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _layer_for(layer: Layer, flavour: Flavour) -> Layer:
    if flavour == "oci":
        return replace(layer, media_type=_OCI_LAYER_TYPES[layer.compression])
    if layer.compression != "gzip":
        raise ValueError(f"Docker schema2 has no media type for {layer.compression} layers")
    return replace(layer, media_type=DOCKER_LAYER_GZIP)


def build_image(
    workdir: Path | str,
    layers: Sequence[LayerSpec | Layer] = (LayerSpec(),),
    *,
    seed: int = 0,
    flavour: Flavour = "oci",
    platform: Platform = Platform(),
    base: BuiltImage | None = None,
) -> BuiltImage:
    """Build a single-platform image.

    ``layers`` mixes new layers (``LayerSpec``, generated from ``seed``) and existing ones
    (``Layer``): pass the same ``Layer`` twice for a repeated layer. ``base`` puts another
    image's layers first, so two images share their base layers.
    """
    built: list[Layer] = list(base.layers) if base is not None else []
    for i, item in enumerate(layers):
        if isinstance(item, Layer):
            built.append(item)
        else:
            # Mix the position into the seed so two equal specs give two different layers.
            built.append(make_layer(workdir, item, seed=seed * 1000 + i))
    built = [_layer_for(layer, flavour) for layer in built]
    config_doc: dict[str, Any] = {
        **platform.as_json(),
        "created": _EPOCH,
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in built]},
        "history": [
            {"created": _EPOCH, "created_by": f"resumer lab layer {i} ({layer.compression})"}
            for i, layer in enumerate(built)
        ],
    }
    config = _dumps(config_doc)
    config_type = OCI_CONFIG if flavour == "oci" else DOCKER_CONFIG
    manifest_type = OCI_MANIFEST if flavour == "oci" else DOCKER_MANIFEST
    manifest = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": config_type,
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [layer.descriptor() for layer in built],
        }
    )
    return BuiltImage(
        layers=built,
        config=config,
        config_digest=sha256_digest(config),
        config_media_type=config_type,
        manifest=manifest,
        manifest_digest=sha256_digest(manifest),
        manifest_media_type=manifest_type,
        platform=platform,
    )


DEFAULT_PLATFORMS = (Platform("linux", "amd64"), Platform("linux", "arm64", "v8"))


def build_index(images: Sequence[BuiltImage], *, flavour: Flavour = "oci") -> BuiltImage:
    """A multi-platform image over single-platform ``images`` (one per platform)."""
    if not images:
        raise ValueError("an index needs at least one image")
    index_type = OCI_INDEX if flavour == "oci" else DOCKER_LIST
    index = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [
                {
                    "mediaType": img.manifest_media_type,
                    "digest": img.manifest_digest,
                    "size": len(img.manifest),
                    "platform": img.platform.as_json(),
                }
                for img in images
            ],
        }
    )
    first = images[0]
    return replace(
        first,
        index=index,
        index_digest=sha256_digest(index),
        index_media_type=index_type,
        children=list(images),
    )


def build_multiplatform(
    workdir: Path | str,
    layers: Sequence[LayerSpec | Layer] = (LayerSpec(),),
    *,
    seed: int = 0,
    flavour: Flavour = "oci",
    platforms: Sequence[Platform] = DEFAULT_PLATFORMS,
) -> BuiltImage:
    """One image per platform, each with its own layers (seeded apart), under one index."""
    children = [
        build_image(workdir, layers, seed=seed * 100 + i, flavour=flavour, platform=p)
        for i, p in enumerate(platforms)
    ]
    return build_index(children, flavour=flavour)


# --------------------------------------------------------------------------- output


def _place_blob(blobs: Path, digest: str, content: bytes | Path) -> None:
    dest = blobs / digest.removeprefix("sha256:")
    if dest.exists():
        return
    if isinstance(content, Path):
        try:
            os.link(content, dest)  # same filesystem: no copy of a 200 MiB layer
            return
        except OSError:
            content = content.read_bytes()
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, dest)


def write_oci_layout(path: Path | str, image: BuiltImage, tag: str) -> Path:
    """Write ``image`` as an OCI image layout that ``skopeo copy oci:PATH:TAG`` reads.

    An existing layout is extended: blobs are shared and an entry with the same tag
    is replaced.
    """
    root = Path(path)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    for digest, content in image.blobs():
        _place_blob(blobs, digest, content)
    index_path = root / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    index["manifests"].append({**image.descriptor(), "annotations": {REF_NAME: tag}})
    tmp = index_path.with_name("index.json.tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, index_path)
    return root


# --------------------------------------------------------------------------- push


class PushError(RuntimeError):
    """The registry refused an upload; the message names the step and the answer."""


async def push_to_registry(
    session_or_url: Any,
    repo: str,
    tag: str,
    image: BuiltImage,
    *,
    base_url: str | None = None,
) -> str:
    """Push ``image`` as ``repo:tag`` through the distribution HTTP API; return its digest.

    ``session_or_url`` is either a base URL (``http://127.0.0.1:5000``; a session is made
    and closed here) or an ``aiohttp.ClientSession`` together with ``base_url``.
    Blobs use the monolithic upload (POST, then PUT ?digest=) and are skipped when a HEAD
    says the registry already has them.
    """
    import aiohttp  # the lab only: the library's own HTTP lives in fetch.py / registry/

    if isinstance(session_or_url, str):
        async with aiohttp.ClientSession(auto_decompress=False) as own:
            return await push_to_registry(own, repo, tag, image, base_url=session_or_url)
    if base_url is None:
        raise ValueError("base_url is required when a session is given")
    session: aiohttp.ClientSession = session_or_url
    base = base_url.rstrip("/")

    async def put_blob(digest: str, content: bytes | Path, size: int) -> None:
        async with session.head(f"{base}/v2/{repo}/blobs/{digest}") as r:
            if r.status == 200:
                return
        async with session.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
            if r.status != 202:
                raise PushError(f"POST upload for {digest}: {r.status} {await r.text()}")
            location = r.headers["Location"]
        if location.startswith("/"):
            location = base + location
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(content, Path):
            with content.open("rb") as f:
                async with session.put(
                    f"{location}{sep}digest={digest}", data=f, headers=headers
                ) as r:
                    status, text = r.status, await r.text()
        else:
            async with session.put(
                f"{location}{sep}digest={digest}", data=content, headers=headers
            ) as r:
                status, text = r.status, await r.text()
        if status != 201:
            raise PushError(f"PUT blob {digest}: {status} {text}")

    async def put_manifest(reference: str, body: bytes, media_type: str) -> None:
        async with session.put(
            f"{base}/v2/{repo}/manifests/{reference}",
            data=body,
            headers={"Content-Type": media_type},
        ) as r:
            if r.status != 201:
                raise PushError(f"PUT manifest {repo}:{reference}: {r.status} {await r.text()}")

    for img in image.images():
        for layer in img.layers:
            await put_blob(layer.digest, layer.path, layer.size)
        await put_blob(img.config_digest, img.config, len(img.config))
    if image.index is not None and image.index_media_type is not None:
        # Children by digest first: the registry checks that an index's manifests exist.
        for img in image.children:
            await put_manifest(img.manifest_digest, img.manifest, img.manifest_media_type)
        await put_manifest(tag, image.index, image.index_media_type)
    else:
        await put_manifest(tag, image.manifest, image.manifest_media_type)
    return image.digest
