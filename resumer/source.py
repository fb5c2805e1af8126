"""Where a blob's bytes come from, resolved anew on every attempt.

A ``Source`` hands out ``Endpoint``s in order of preference. An endpoint's URL may carry a
secret (a pre-signed query string) and its headers an ``Authorization``: neither is ever
stored or logged; only ``display`` is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from .errors import UrlError


def redact_url(url: str) -> str:
    """The URL without userinfo, query string or fragment: safe for the database and logs.

    Never raises: a URL whose host or port does not parse keeps its scheme, its host
    part without userinfo, and its path.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"  # an IPv6 address
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:  # a bad port, an unclosed "[" …
        rest = url.partition("#")[0].partition("?")[0]
        scheme, sep, rest = rest.partition("://")
        if not sep:
            return "<unparsable URL>"
        netloc, slash, path = rest.partition("/")
        return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


#: the schemes ``fetch`` speaks
SCHEMES = ("http", "https")
_SPEAKS = "resumer fetch speaks http:// and https://"
#: what a host name or address may hold (IDNs are encoded first; IPv6 sits in brackets)
_HOST = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=-]+|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9._~-]+)?\]")


def check_url(url: str) -> None:
    """Refuse at once what no attempt could fetch: ``UrlError`` naming the (redacted) URL
    and the cause. Only the scheme and the host are judged; the server judges the rest."""
    if not url:
        raise UrlError(f"URL is empty; {_SPEAKS}")
    shown = "".join(c if c.isprintable() else "?" for c in redact_url(url))
    if any(c.isspace() or not c.isprintable() for c in url):
        raise UrlError(f"URL {shown}: contains spaces or control characters; encode them (%20)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlError(f"URL {shown}: malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if "://" not in url:
        if scheme in SCHEMES:
            raise UrlError(f"URL {shown}: malformed: expected {scheme}://HOST/PATH")
        raise UrlError(f"URL {shown}: no scheme ({_SPEAKS}); did you mean https://{shown} ?")
    if scheme not in SCHEMES:
        raise UrlError(f"URL {shown}: unsupported scheme {scheme!r}; {_SPEAKS}")
    host = parts.netloc.rpartition("@")[2]
    if port is not None:
        host = host.rpartition(":")[0]
    elif host.endswith(":"):
        host = host[:-1]  # "host:" has an empty port: the default one
    if not host:
        raise UrlError(f"URL {shown}: no host")
    try:
        encoded = host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError:
        raise UrlError(f"URL {shown}: invalid host name") from None
    if not _HOST.fullmatch(encoded):
        raise UrlError(f"URL {shown}: invalid host")
    if port == 0:
        raise UrlError(f"URL {shown}: port 0 cannot be connected to")


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
