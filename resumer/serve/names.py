"""What a mirror request names, checked before any path or URL is built from it.

The request path is parsed from its raw form: a name, tag or digest never holds ``%``,
so anything percent-encoded (``%2e%2e``, ``%2f``) is refused outright rather than decoded
into something else. Names follow the OCI distribution grammar, whose components cannot
be ``.`` or ``..``; tags and digests cannot hold ``/``. So no accepted request names a
file outside the store: blobs and manifests are looked up by a validated digest only.

``parse_range`` reads one ``Range`` header into what to send: a single span, a 416, or
the whole blob. It never raises.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

#: the OCI distribution spec's name grammar: path components joined by '/'
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
#: the spec's digest grammar: an algorithm we may not support, and its encoded part
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
#: a registry host[:port] for ``?ns=`` (no userinfo, no path, no scheme)
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?")

NAME_MAX = 255
#: a request path longer than this is refused before it is split
PATH_MAX = 1024


class Kind(enum.Enum):
    MANIFESTS = "manifests"
    BLOBS = "blobs"


@dataclass(frozen=True)
class Target:
    """A valid ``/v2/<name>/<kind>/<reference>`` request."""

    name: str
    kind: Kind
    #: a tag (manifests only) or ``sha256:<64 hex>``
    reference: str

    @property
    def digest(self) -> str | None:
        return self.reference if is_digest(self.reference) else None


class BadRequest(Exception):
    """A request the mirror refuses: the OCI error code, HTTP status and the reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def is_digest(text: str) -> bool:
    return _SHA256.fullmatch(text) is not None


def valid_name(name: str) -> bool:
    return len(name) <= NAME_MAX and _NAME.fullmatch(name) is not None


def valid_tag(tag: str) -> bool:
    return _TAG.fullmatch(tag) is not None


def valid_host(host: str) -> bool:
    return len(host) <= NAME_MAX and _HOST.fullmatch(host) is not None


def check_digest(text: str) -> str:
    """``text`` if it is a sha256 digest; else DIGEST_INVALID (or UNSUPPORTED for another
    algorithm that is well formed)."""
    if is_digest(text):
        return text
    if _ANY_DIGEST.fullmatch(text) and not text.startswith("sha256:"):
        raise BadRequest(400, "UNSUPPORTED", f"digest {text[:80]!r}: only sha256 is supported")
    raise BadRequest(400, "DIGEST_INVALID", f"invalid digest {text[:80]!r}")


def parse_target(raw_path: str) -> Target | None:
    """The request behind a raw (still encoded) path under ``/v2/``; None for a path that
    is no manifest or blob route at all. ``BadRequest`` for one that is, but invalid."""
    path = raw_path.partition("?")[0]
    if len(path) > PATH_MAX:
        raise BadRequest(414, "NAME_INVALID", "request path too long")
    if "%" in path or "\\" in path or "\x00" in path:
        raise BadRequest(400, "NAME_INVALID", "percent-encoded or escaped characters in the path")
    if not path.startswith("/v2/"):
        return None
    parts = path[len("/v2/") :].split("/")
    if len(parts) < 3 or parts[-2] not in ("manifests", "blobs"):
        return None
    kind = Kind(parts[-2])
    name, reference = "/".join(parts[:-2]), parts[-1]
    if not valid_name(name):
        raise BadRequest(400, "NAME_INVALID", f"invalid repository name {name[:80]!r}")
    if kind is Kind.BLOBS:
        return Target(name, kind, check_digest(reference))
    if ":" in reference:
        return Target(name, kind, check_digest(reference))
    if not valid_tag(reference):
        raise BadRequest(400, "MANIFEST_INVALID", f"invalid tag {reference[:80]!r}")
    return Target(name, kind, reference)


# --------------------------------------------------------------------------- Range


@dataclass(frozen=True)
class Span:
    """Bytes ``start`` to ``end`` inclusive, of a blob of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


class Unsatisfiable:
    """416: no byte of the blob is in the range asked (or several ranges were asked)."""

    def __init__(self, size: int) -> None:
        self.size = size

    @property
    def content_range(self) -> str:
        return f"bytes */{self.size}"


_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")
#: more digits than any file offset: refused without converting them
_DIGITS_MAX = 19


def parse_range(header: str | None, size: int) -> Span | Unsatisfiable | None:
    """What one ``Range`` header asks of a blob of ``size`` bytes.

    None: send the whole blob (no header, or one that is not a bytes range: RFC 9110 says
    to ignore a Range it does not understand). ``Span``: a 206 with these bytes (an end
    past the blob is cut to it). ``Unsatisfiable``: a 416 with ``bytes */SIZE``, for a
    range starting past the end, an empty suffix, or several ranges (one is served).
    """
    if header is None:
        return None
    if "," in header:
        return Unsatisfiable(size) if header.lstrip().startswith("bytes") else None
    m = _RANGE.fullmatch(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if len(first) > _DIGITS_MAX or len(last) > _DIGITS_MAX:
        return Unsatisfiable(size)
    if not first and not last:
        return None
    if not first:  # bytes=-N: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return Unsatisfiable(size)
        return Span(max(0, size - n), size - 1, size)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # syntactically invalid: ignored, as RFC 9110 says
    if start >= size:
        return Unsatisfiable(size)
    return Span(start, min(end, size - 1), size)
