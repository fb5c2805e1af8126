"""Where a blob's bytes come from, resolved anew on every attempt.

A ``Source`` hands out ``Endpoint``s in order of preference. An endpoint's URL may carry a
secret (a pre-signed query string) and its headers an ``Authorization``: neither is ever
stored or logged; only ``display`` is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL without userinfo, query string or fragment: safe for the database and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True)
class Endpoint:
    """One place to GET the blob from, for one attempt."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    #: the host:port that this endpoint names; used to prefer hosts that honour Range
    host: str = ""
    #: False for HTTPS to an insecure registry: its certificate is not verified. Only
    #: requests to this URL's own host:port skip verification, never a redirect elsewhere.
    verify_tls: bool = True

    @property
    def display(self) -> str:
        return redact_url(self.url)


class Source(Protocol):
    """Hands out endpoints for a blob and refreshes credentials on a 401."""

    @property
    def display(self) -> str:
        """A name for logs and the database: never a secret."""
        ...

    async def endpoints(self) -> list[Endpoint]:
        """Endpoints in order of preference, resolved anew for every attempt."""
        ...

    async def refresh_auth(self, endpoint: Endpoint, challenge: str | None) -> bool:
        """Get a fresh token after a 401; False when there is nothing to refresh."""
        ...


class UrlSource:
    """A plain URL, as given to ``resumer fetch``."""

    def __init__(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        self.url = url
        self._headers = dict(headers or {})

    @property
    def display(self) -> str:
        return redact_url(self.url)

    async def endpoints(self) -> list[Endpoint]:
        parts = urlsplit(self.url)
        return [Endpoint(self.url, self._headers, parts.netloc.rpartition("@")[2])]

    async def refresh_auth(self, endpoint: Endpoint, challenge: str | None) -> bool:
        return False
