"""Manifests and images: media types, and the parsing and validation of manifests,
indexes, image configs and descriptors into a ``ResolvedImage``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DigestMismatchError, PlatformNotFoundError, RegistryError
from .platform import Platform, _matches, _platform_candidates, normalize_platform
from .reference import _DIGEST, Reference

if TYPE_CHECKING:  # a type only: the GET that answered it is the client's
    from ..http import SmallResponse as _Response


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_SCHEMA1 = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
_INDEXES = frozenset({OCI_INDEX, DOCKER_LIST})
_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_IMAGE_CONFIGS = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
#: Without this list the CNCF registry answers 404 for OCI manifests and converts Docker
#: ones to schema1, so every manifest GET sends it.
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

#: The distribution registry refuses manifests above 4 MiB; so do we.
MAX_MANIFEST_BYTES = 4 << 20
#: Image configs are small JSON; refuse a "config" big enough to hurt memory.
MAX_CONFIG_BYTES = 32 << 20


@dataclass(frozen=True)
class LayerDescriptor:
    """One layer of an image, in order from the base."""

    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class ResolvedImage:
    """An image reference resolved to everything needed before the first layer byte moves."""

    reference: Reference
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str
    config: bytes
    config_digest: str
    config_media_type: str
    layers: tuple[LayerDescriptor, ...]
    #: rootfs.diff_ids of the config, one per layer, in the same order
    diff_ids: tuple[str, ...]
    #: ``os/arch[/variant]`` of the image, from the index entry or the config
    platform: str
    index: bytes | None = None
    index_digest: str | None = None
    index_media_type: str | None = None
    #: where the manifest came from (redacted base URL): a mirror or the origin
    served_by: str = ""

    @property
    def digest(self) -> str:
        """The digest ``docker pull`` prints: the index's when there is one."""
        return self.index_digest or self.manifest_digest


def _check_manifest_digest(what: str, resp: _Response, pinned: str | None) -> str:
    digest = "sha256:" + hashlib.sha256(resp.body).hexdigest()
    if pinned is not None and digest != pinned:
        raise DigestMismatchError(
            f"manifest {what}: content hashes to {digest}, not the pinned {pinned}",
            resumed=False,
        )
    header = resp.headers.get("Docker-Content-Digest")
    if header and header.strip() != digest:
        raise DigestMismatchError(
            f"manifest {what}: content hashes to {digest} but the registry says "
            f"Docker-Content-Digest {header.strip()}",
            resumed=False,
        )
    return digest


def _load_json(what: str, body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"manifest {what}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise RegistryError(f"manifest {what}: not a JSON object")
    return doc


def _media_type(what: str, doc: Mapping[str, Any], content_type: str) -> str:
    declared = doc.get("mediaType")
    header = content_type.partition(";")[0].strip()
    if doc.get("schemaVersion") == 1 or declared in _SCHEMA1 or header in _SCHEMA1:
        raise RegistryError(
            f"manifest {what}: Docker schema1 manifests are not supported "
            "(the registry should serve schema2 or OCI; it did not honour Accept)"
        )
    if doc.get("schemaVersion") != 2:
        raise RegistryError(
            f"manifest {what}: unsupported schemaVersion {doc.get('schemaVersion')!r}"
        )
    for candidate in (declared, header):
        if isinstance(candidate, str) and candidate in _INDEXES | _MANIFESTS:
            return candidate
    # OCI makes mediaType optional: infer it from the shape.
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    raise RegistryError(f"manifest {what}: unknown media type {declared or header or '(none)'!r}")


def _descriptor(what: str, field: str, raw: Any) -> LayerDescriptor:
    if not isinstance(raw, dict):
        raise RegistryError(f"manifest {what}: {field} is not an object")
    digest, size, media_type = raw.get("digest"), raw.get("size"), raw.get("mediaType")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise RegistryError(f"manifest {what}: {field} has a missing or non-sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"manifest {what}: {field} has a missing or invalid size")
    if not isinstance(media_type, str) or not media_type:
        raise RegistryError(f"manifest {what}: {field} has no mediaType")
    return LayerDescriptor(digest, size, media_type)


def _parse_image_manifest(
    what: str, doc: Mapping[str, Any]
) -> tuple[LayerDescriptor, list[LayerDescriptor]]:
    if "config" not in doc:
        raise RegistryError(f"manifest {what}: no config descriptor")
    config = _descriptor(what, "config", doc["config"])
    if config.media_type not in _IMAGE_CONFIGS:
        raise RegistryError(
            f"manifest {what}: not a container image (config media type {config.media_type})"
        )
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryError(f"manifest {what}: 'layers' is missing or not a list")
    layers = [_descriptor(what, f"layers[{i}]", raw) for i, raw in enumerate(raw_layers)]
    return config, layers


def _parse_config(what: str, digest: str, body: bytes) -> tuple[list[str], Platform]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"config {digest} of {what}: not valid JSON") from exc
    rootfs = doc.get("rootfs") if isinstance(doc, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and _DIGEST.match(d) for d in diff_ids
    ):
        raise RegistryError(
            f"config {digest} of {what}: rootfs.diff_ids is missing or not a list of sha256 digests"
        )
    assert isinstance(doc, dict)
    plat = normalize_platform(
        str(doc.get("os") or "unknown"),
        str(doc.get("architecture") or "unknown"),
        str(doc.get("variant") or ""),
    )
    return list(diff_ids), plat


def _pick_platform(
    what: str, doc: Mapping[str, Any], wanted: Platform
) -> tuple[dict[str, Any], Platform]:
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError(f"index {what}: 'manifests' is missing or not a list")
    available: list[tuple[Platform, dict[str, Any]]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RegistryError(f"index {what}: manifests[{i}] is not an object")
        if not isinstance(entry.get("digest"), str) or not _DIGEST.match(entry["digest"]):
            raise RegistryError(f"index {what}: manifests[{i}] has a missing or bad digest")
        plat = entry.get("platform")
        if not isinstance(plat, dict):
            continue
        p = normalize_platform(
            str(plat.get("os", "")),
            str(plat.get("architecture", "")),
            str(plat.get("variant") or ""),
        )
        if p.os == "unknown" or p.architecture == "unknown":
            continue  # buildx attestations, not images
        available.append((p, entry))
    for candidate in _platform_candidates(wanted):
        # An exact variant first; a request without a variant takes the first of its arch.
        for p, entry in available:
            if _matches(p, candidate, any_variant=not candidate.variant):
                if entry.get("mediaType") in _INDEXES:
                    raise RegistryError(f"index {what}: nested indexes are not supported")
                return entry, p
    names = ", ".join(sorted({str(p) for p, _ in available})) or "none"
    raise PlatformNotFoundError(
        f"{what}: no manifest for platform {wanted}; available platforms: {names}"
    )
