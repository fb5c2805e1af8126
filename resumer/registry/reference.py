"""Image references: ``Reference`` / ``parse_reference``, normalised the way Docker does it
(``alpine`` → ``docker.io/library/alpine:latest``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ReferenceError_

DOCKER_HUB = "docker.io"
#: where Docker Hub's distribution API actually answers
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# Docker's grammar (distribution/reference), written out again here.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME_MAX = 255


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: ``registry/repository[:tag][@digest]``."""

    #: ``docker.io`` for Docker Hub, otherwise ``host[:port]`` as written
    registry: str
    #: the repository path, ``library/alpine`` for Docker Hub's official images
    repository: str
    tag: str | None = None
    #: ``sha256:<hex>`` when pinned; the manifest must hash to it
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host[:port] that serves the distribution API for this registry."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def is_docker_hub(self) -> bool:
        return self.registry == DOCKER_HUB

    @property
    def manifest_ref(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned (Docker ignores the tag)."""
        return self.digest or self.tag or "latest"


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference as ``docker pull`` does.

    A bare name gets ``docker.io``, a one-component Hub name gets ``library/``, and a
    reference with neither tag nor digest gets ``:latest``.
    """
    raw = text
    if not text or text != text.strip():
        raise ReferenceError_(f"invalid reference {raw!r}: empty or surrounded by whitespace")
    digest: str | None = None
    if "@" in text:
        text, _, digest = text.partition("@")
        if not _ANY_DIGEST.match(digest):
            raise ReferenceError_(f"invalid reference {raw!r}: malformed digest {digest!r}")
        if not _DIGEST.match(digest):
            raise ReferenceError_(
                f"invalid reference {raw!r}: only sha256 digests with 64 lowercase hex "
                f"digits are supported, got {digest!r}"
            )
    tag: str | None = None
    # A tag is the part after the last ':' that comes after the last '/': a ':' before
    # that is a port.
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise ReferenceError_(
                f"invalid reference {raw!r}: invalid tag {tag!r} (letters, digits, '_', "
                f"'.' and '-', not starting with '.' or '-', at most 128 characters)"
            )
    if not text:
        raise ReferenceError_(f"invalid reference {raw!r}: no repository name")

    registry, path = _split_domain(text)
    if not _DOMAIN.match(registry):
        raise ReferenceError_(f"invalid reference {raw!r}: invalid registry host {registry!r}")
    if registry in ("index.docker.io",):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if path != path.lower():
        raise ReferenceError_(f"invalid reference {raw!r}: repository name must be lowercase")
    for component in path.split("/"):
        if not _PATH_COMPONENT.match(component):
            raise ReferenceError_(
                f"invalid reference {raw!r}: invalid repository path component "
                f"{component!r} (lowercase letters and digits, separated by '.', '_', "
                f"'__' or dashes)"
            )
    if _HEX64.match(path.rpartition("/")[2]) and registry == DOCKER_HUB and tag is None:
        # Docker refuses these: they would be mistaken for image IDs.
        raise ReferenceError_(
            f"invalid reference {raw!r}: a 64-character hexadecimal string is an image ID, "
            f"not a repository name"
        )
    if len(registry) + 1 + len(path) > _NAME_MAX:
        raise ReferenceError_(
            f"invalid reference {raw!r}: repository name longer than {_NAME_MAX} characters"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, path, tag, digest)


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    # Docker's rule: the first component names a registry only if it looks like a host
    # (a dot, a port, "localhost") or has capitals, which a repository path never has.
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return DOCKER_HUB, name
