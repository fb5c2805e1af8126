"""The one HTTP edge: redirects, Retry-After, status → error, redaction.

The blob fetcher and the registry client both open their GETs here, so one set of rules
holds for every request resumer makes, and aiohttp's exceptions end here, mapped into
``resumer.errors`` with ``raise … from exc``:

- ``open_get`` follows redirects by hand (at most ``MAX_REDIRECTS``, http and https
  only). Every header is kept across them, Range and If-Range included, except
  Authorization, which is dropped once a redirect leaves the first URL's origin (scheme
  and host:port): credentials are for the registry, never for the storage it redirects
  to, and never for a downgrade to plain HTTP. An unverified certificate is accepted on
  the first URL's own host:port only (an insecure registry), never after a redirect
  elsewhere. The redirected URL lives in the response only: nothing stores it.
- ``status_error`` is the one status → error table (below); ``retry_after`` reads
  Retry-After as delta-seconds or an HTTP-date.
- ``describe`` and ``redact_url`` keep secrets (userinfo, pre-signed query strings) out of
  every message.

| status                        | error                                            |
|-------------------------------|--------------------------------------------------|
| 200, 206                      | none                                             |
| 401                           | UnauthorizedError (with the challenge)           |
| 403                           | ForbiddenError (with the challenge, if any)      |
| 404                           | NotFoundError                                    |
| 408, 429, 500–599             | ServerError (with Retry-After)                   |
| 3xx that was not followed     | PermanentError: a redirect without Location      |
| anything else (other 4xx,     | PermanentError: unexpected HTTP status           |
| 1xx, other 2xx, ≥ 600)        |                                                  |

416 is not in it: what a 416 means depends on the offset asked for, which only the
fetcher knows (DESIGN.md, "HTTP Range rules"); it handles 416 before asking this table.

Where the two tables this one replaces disagreed (fetch._handle, registry._status_error):

- 403 is ForbiddenError, refreshed once by the attempt policy, for blobs and manifests
  alike (the registry refreshed only when the 403 carried a challenge; a refresh without
  one finds nothing to send and gives up at once, so nothing else changes).
- 600 and above: unexpected (the registry retried them as 5xx).
- Other 4xx and unfollowed 3xx: PermanentError (the registry raised RegistryError; both
  are permanent). Registry bodies' ``{"errors": …}`` text is passed in as ``detail``.
- Retry-After: delta-seconds (digits) or an HTTP-date (the registry took any number,
  fractions and negatives included, and ignored dates).
- Too many redirects: BrokenServerError, transient (the registry's was permanent); a
  Location that does not parse or leaves http(s): as the fetcher did. Authorization is
  dropped on a change of scheme too (the fetcher dropped it on a change of host:port).
"""

from __future__ import annotations

import email.utils
import errno
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp

from .clock import Clock
from .errors import (
    BrokenServerError,
    ConnectFailedError,
    ConnectionCutError,
    ForbiddenError,
    NotFoundError,
    PermanentError,
    ServerError,
    StallError,
    TransferError,
    UnauthorizedError,
    UntrustedCertificateError,
)
from .source import redact_url

__all__ = [
    "MAX_REDIRECTS",
    "REDIRECTS",
    "SmallResponse",
    "challenge_of",
    "describe",
    "get_small",
    "open_get",
    "post_form",
    "read_limited",
    "redact_url",
    "retry_after",
    "speaks_tls",
    "status_error",
]

MAX_REDIRECTS = 10
REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: What to do about a certificate nothing trusts, when the caller has nothing better.
CERT_HINT = (
    "if the server uses a private or self-signed certificate, trust its CA with "
    "SSL_CERT_FILE=CA.pem"
)
#: Of an error page, the start is enough for a message.
ERROR_BODY_LIMIT = 1 << 16


# --------------------------------------------------------------------------- messages


def describe(exc: BaseException) -> str:
    """An exception as text for a message, with every URL in it redacted."""
    text = str(exc) or type(exc).__name__
    # aiohttp messages can quote the full URL, userinfo and query string included.
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+", lambda m: redact_url(m.group(0)), text)


def retry_after(value: str | None, clock: Clock) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - clock.time())


def challenge_of(headers: Mapping[str, str]) -> str | None:
    """Every WWW-Authenticate value of a response, joined (a server may send several)."""
    getall = getattr(headers, "getall", None)
    values: list[str] = list(getall("WWW-Authenticate", [])) if getall else []
    if not values and headers.get("WWW-Authenticate"):
        values = [headers["WWW-Authenticate"]]
    return ", ".join(values) or None


def status_error(
    status: int, where: str, headers: Mapping[str, str], clock: Clock, *, detail: str = ""
) -> TransferError | None:
    """The error a response status means (the table above), or None for 200 and 206.

    ``where`` is the redacted URL for the message; ``detail`` is appended to it (the
    registry's own error text, ": CODE message").
    """
    if status in (200, 206):
        return None
    if status == 401:
        return UnauthorizedError(
            f"{where}: access denied (HTTP 401 Unauthorized){detail}",
            challenge=challenge_of(headers),
        )
    if status == 403:
        return ForbiddenError(
            f"{where}: access denied (HTTP 403 Forbidden){detail}", challenge=challenge_of(headers)
        )
    if status == 404:
        return NotFoundError(f"{where}: not found (HTTP 404){detail}", status=404)
    if status in (408, 429) or 500 <= status < 600:
        return ServerError(
            f"{where}: HTTP {status}{detail}",
            status=status,
            retry_after=retry_after(headers.get("Retry-After"), clock),
        )
    if status in REDIRECTS:
        return PermanentError(f"{where}: HTTP {status} redirect without a Location", status=status)
    return PermanentError(f"{where}: unexpected HTTP {status}{detail}", status=status)


# --------------------------------------------------------------------------- requests


async def open_get(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    *,
    verify_tls: bool = True,
    cert_hint: str = CERT_HINT,
    stall_timeout: float | None = None,
    read_bufsize: int | None = None,
) -> aiohttp.ClientResponse:
    """GET ``url``, following redirects by hand; the response is the caller's to close.

    ``read_bufsize``: how much aiohttp reads ahead of the caller (it buffers up to twice
    that), if not the session's.

    Raises ConnectFailedError when no response came, UntrustedCertificateError (with
    ``cert_hint``, saying what to do), and for redirects BrokenServerError (too many, or
    a Location that does not parse) or PermanentError (not http or https).
    """
    origin = _origin(url)
    sent = dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        # Unverified only on the first URL's own host:port (an insecure registry).
        verify = verify_tls or urlsplit(url).netloc != origin[1]
        resp = await _send(
            session,
            url,
            sent,
            verify=verify,
            cert_hint=cert_hint,
            stall_timeout=stall_timeout,
            read_bufsize=read_bufsize,
        )
        location = resp.headers.get("Location") if resp.status in REDIRECTS else None
        if location is None:
            return resp
        resp.release()
        url = _redirect_target(url, location, resp.status)
        if _origin(url) != origin:
            sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
    raise BrokenServerError(f"{redact_url(url)}: more than {MAX_REDIRECTS} redirects")


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    *,
    verify: bool,
    cert_hint: str,
    stall_timeout: float | None = None,
    read_bufsize: int | None = None,
) -> aiohttp.ClientResponse:
    try:
        return await session.get(
            url,
            read_bufsize=read_bufsize,
            headers=headers,
            allow_redirects=False,
            auto_decompress=False,
            ssl=verify,
            timeout=_read_timeout(session, stall_timeout),
        )
    except aiohttp.ClientConnectorCertificateError as exc:
        raise untrusted_certificate(url, exc, cert_hint) from exc
    except aiohttp.ServerTimeoutError as exc:
        raise _stalled(url, stall_timeout) from exc
    except aiohttp.InvalidURL as exc:
        # Another attempt would ask for the same URL.
        raise PermanentError(f"{redact_url(url)}: invalid URL") from exc
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ConnectFailedError(f"{redact_url(url)}: {describe(exc)}") from exc


def untrusted_certificate(
    url: str, exc: aiohttp.ClientConnectorCertificateError, hint: str
) -> UntrustedCertificateError:
    """A certificate nothing trusts: permanent (another attempt meets the same one)."""
    cause = exc.certificate_error
    reason = getattr(cause, "verify_message", None) or describe(cause)
    return UntrustedCertificateError(
        f"{redact_url(url)}: TLS certificate not trusted ({reason}); {hint}"
    )


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc


def _redirect_target(url: str, location: str, status: int) -> str:
    try:
        target = urljoin(url, location)
        scheme = urlsplit(target).scheme.lower()
    except ValueError as exc:
        raise BrokenServerError(
            f"{redact_url(url)}: redirect to a malformed URL", status=status
        ) from exc
    if scheme not in ("http", "https"):
        raise PermanentError(
            f"{redact_url(target)}: redirected to an unsupported scheme (http and https only)",
            status=status,
        )
    return target


# --------------------------------------------------------------------------- small bodies


@dataclass(frozen=True)
class SmallResponse:
    """A response read whole: a manifest, a config, a token, or the start of an error page."""

    status: int
    #: case-insensitive, every value kept (``challenge_of`` joins WWW-Authenticate)
    headers: Mapping[str, str]
    body: bytes
    #: where the body came from after redirects: for this request only, never stored
    url: str


async def get_small(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    *,
    limit: int,
    verify_tls: bool = True,
    cert_hint: str = CERT_HINT,
    stall_timeout: float | None = None,
) -> SmallResponse:
    """``open_get`` and read the body: up to ``limit`` bytes of a 200 (more is refused),
    the start of anything else. ``stall_timeout``: no byte (headers or body) for that
    long is a ``StallError``, as for blobs: a manifest GET must never hang a pull."""
    resp = await open_get(
        session,
        url,
        headers,
        verify_tls=verify_tls,
        cert_hint=cert_hint,
        stall_timeout=stall_timeout,
    )
    return await _read_small(resp, limit, stall_timeout)


async def post_form(
    session: aiohttp.ClientSession,
    url: str,
    form: Mapping[str, str],
    *,
    limit: int,
    stall_timeout: float | None = None,
) -> SmallResponse:
    """POST a form (an OAuth2 token request) and read the answer. Redirects are not
    followed: a POST's body must not be re-sent to wherever a server points."""
    try:
        resp = await session.post(
            url,
            data=dict(form),
            allow_redirects=False,
            timeout=_read_timeout(session, stall_timeout),
        )
    except aiohttp.ClientConnectorCertificateError as exc:
        raise untrusted_certificate(url, exc, CERT_HINT) from exc
    except aiohttp.ServerTimeoutError as exc:
        raise _stalled(url, stall_timeout) from exc
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ConnectFailedError(f"{redact_url(url)}: {describe(exc)}") from exc
    return await _read_small(resp, limit, stall_timeout)


def _read_timeout(
    session: aiohttp.ClientSession, stall_timeout: float | None
) -> aiohttp.ClientTimeout | None:
    """The session's timeouts, with a limit on the wait for each read: a small request's
    stall watchdog (a blob's is fetch.py's own)."""
    if not stall_timeout:
        return None
    return aiohttp.ClientTimeout(
        total=None, sock_connect=session.timeout.sock_connect, sock_read=stall_timeout
    )


def _stalled(url: str, stall_timeout: float | None) -> StallError:
    return StallError(f"{redact_url(url)}: stalled: no data for {stall_timeout:g} s")


async def _read_small(
    resp: aiohttp.ClientResponse, limit: int, stall_timeout: float | None = None
) -> SmallResponse:
    where = redact_url(str(resp.url))
    async with resp:
        try:
            if resp.status == 200:
                body = await read_limited(resp, limit)
            else:
                body = await resp.content.read(ERROR_BODY_LIMIT)
        except aiohttp.ServerTimeoutError as exc:
            raise _stalled(where, stall_timeout) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ConnectionCutError(f"{where}: {describe(exc)}") from exc
        return SmallResponse(resp.status, resp.headers.copy(), body, str(resp.url))


async def read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes so a hostile server cannot fill memory."""
    where = redact_url(str(resp.url))
    if resp.content_length is not None and resp.content_length > limit:
        raise PermanentError(f"{where}: {resp.content_length} bytes, more than {limit}")
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        buf += chunk
        if len(buf) > limit:
            raise PermanentError(f"{where}: more than {limit} bytes")
    return bytes(buf)


# --------------------------------------------------------------------------- TLS probe


async def speaks_tls(session: aiohttp.ClientSession, url: str) -> bool:
    """Does the server at ``url`` (https://…) speak TLS? One GET, certificate unverified.

    Any HTTP answer: True. A handshake the server does not speak (it answers in plain
    HTTP, or hangs up): False. Anything else (refused, timed out) decides nothing and is
    raised, as ConnectFailedError.
    """
    try:
        async with session.get(
            url, ssl=False, allow_redirects=False, headers={"Accept-Encoding": "identity"}
        ):
            return True
    except aiohttp.ClientError as exc:
        if _speaks_no_tls(exc):
            return False
        raise ConnectFailedError(f"{redact_url(url)}: {describe(exc)}") from exc
    except (TimeoutError, OSError) as exc:
        raise ConnectFailedError(f"{redact_url(url)}: {describe(exc)}") from exc


def _speaks_no_tls(exc: aiohttp.ClientError) -> bool:
    """Did a TLS handshake fail because the server does not speak TLS at all?

    A plain-HTTP server answers a ClientHello with an HTTP 400 (the handshake sees a
    "wrong version number") or hangs up. Refused connections, unreachable hosts and DNS
    failures say nothing about TLS.
    """
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return False  # a TLS server after all (the probe does not verify, so not expected)
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerDisconnectedError):
        return True
    if isinstance(exc, aiohttp.ClientOSError):
        cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
        return isinstance(
            cause, ssl.SSLError | ConnectionResetError | ConnectionAbortedError
        ) or cause.errno in (errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE)
    return False


def make_session(*, connect_timeout: float | None) -> aiohttp.ClientSession:
    """The engine's one session (DESIGN.md, conventions)."""
    # total=None: a layer may take hours on a satellite link; stalls are our watchdog's job.
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=connect_timeout or None, sock_read=None
    )
    return aiohttp.ClientSession(
        timeout=timeout,
        auto_decompress=False,
        # One network read is the unit a kill can lose on top of unrecorded chunks.
        read_bufsize=256 * 1024,
        connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
    )
