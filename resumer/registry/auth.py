"""Auth: ``WWW-Authenticate`` challenges, credentials from Docker's ``config.json``, and
what a Bearer token is kept as. The client (``client.py``) asks for and caches the tokens."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .reference import _HUB_ALIASES, DOCKER_HUB, Reference

log = logging.getLogger(__name__)


_AUTH_PARAM = re.compile(r'[\s,]*([\w!#$%&\'*+.^`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)')
_AUTH_SCHEME = re.compile(r"[\s,]*([A-Za-z][\w.+-]*)(?=\s|,|$)")


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: ``Bearer realm="…",service="…"``."""

    scheme: str
    params: Mapping[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value; it may hold several challenges (RFC 9110 §11.6.1)."""
    out: list[Challenge] = []
    scheme: str | None = None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(header):
        m = _AUTH_PARAM.match(header, pos)
        if m and scheme is not None:
            value = m.group(2)
            if value.startswith('"') and len(value) >= 2:
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[m.group(1).lower()] = value
            pos = m.end()
            continue
        m = _AUTH_SCHEME.match(header, pos)
        if not m:
            break  # malformed: keep what parsed so far
        if scheme is not None:
            out.append(Challenge(scheme, params))
        scheme, params = m.group(1).lower(), {}
        pos = m.end()
    if scheme is not None:
        out.append(Challenge(scheme, params))
    return out


@dataclass(frozen=True)
class Credentials:
    """What ``config.json`` holds for one registry. ``repr`` never shows the secrets."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, secrets=<redacted>)"


def _hub_key(host: str) -> str:
    return DOCKER_HUB if host in _HUB_ALIASES else host


def load_docker_credentials(config_dir: Path | None = None) -> dict[str, Credentials]:
    """Read ``auths`` from Docker's config.json, keyed by host[:port].

    ``DOCKER_CONFIG`` is honoured, then ``~/.docker``. credsStore and credHelpers are not
    run: a missing or unreadable file means anonymous access, never an error.
    """
    if config_dir is None:
        env = os.environ.get("DOCKER_CONFIG")
        config_dir = Path(env) if env else Path.home() / ".docker"
    path = config_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        # The message of a JSONDecodeError quotes no content, only a position.
        log.warning("ignoring docker config %s: %s", path, type(exc).__name__)
        return {}
    auths = raw.get("auths") if isinstance(raw, dict) else None
    if not isinstance(auths, dict):
        return {}
    out: dict[str, Credentials] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        # Keys are "host", "https://host" or Hub's legacy "https://index.docker.io/v1/".
        host = _hub_key(urlsplit(key).netloc if "://" in key else key.partition("/")[0])
        user = entry.get("username") if isinstance(entry.get("username"), str) else ""
        password = entry.get("password") if isinstance(entry.get("password"), str) else ""
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                log.warning("ignoring undecodable auth entry for %s in %s", host, path)
                continue
        token = entry.get("identitytoken")
        creds = Credentials(
            str(user or ""), str(password or ""), token if isinstance(token, str) else ""
        )
        if creds.username or creds.password or creds.identity_token:
            out[host] = creds
    return out


@dataclass
class _Token:
    value: str
    expires_at: float  # on the injected clock's monotonic scale


#: Spec default when a token server gives no expires_in; Docker uses the same floor.
_TOKEN_MIN_LIFETIME = 60.0
#: A token server's answer is a small JSON document.
_TOKEN_LIMIT = 1 << 20
#: Refresh a token with less than this left, so a request never races its expiry.
_TOKEN_MARGIN = 20.0


def _pull_scope(ref: Reference) -> str:
    return f"repository:{ref.repository}:pull"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
