"""The client: ``RegistryClient`` (hosts, mirrors, insecure registries and their probe,
token requests, small GETs, ``resolve``) and ``RegistryBlobSource``, the ``Source`` of one
layer blob, which lives here because it speaks for the client (its probe, its tokens, its
host-health record).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

from .. import http
from ..clock import Clock, SystemClock
from ..config import Config
from ..errors import (
    AccessDeniedError,
    BrokenServerError,
    ConnectFailedError,
    DigestMismatchError,
    PlatformNotFoundError,
    RegistryError,
    ResumerError,
)
from ..hosts import HostHealth, host_of
from ..retry import AttemptBudget, AttemptPolicy, LinearDelay, run
from ..source import Endpoint, redact_url
from .auth import (
    _TOKEN_LIMIT,
    _TOKEN_MARGIN,
    _TOKEN_MIN_LIFETIME,
    Challenge,
    Credentials,
    _basic,
    _hub_key,
    _pull_scope,
    _Token,
    load_docker_credentials,
    parse_challenges,
)
from .manifest import (
    _INDEXES,
    _MANIFESTS,
    MANIFEST_ACCEPT,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    ResolvedImage,
    _check_manifest_digest,
    _load_json,
    _media_type,
    _parse_config,
    _parse_image_manifest,
    _pick_platform,
)
from .platform import (
    Platform,
    _matches,
    _platform_candidates,
    host_platform_default,
    parse_platform,
)
from .reference import _DIGEST, Reference, parse_reference

if TYPE_CHECKING:  # the session's type only: requests go through http.py
    import aiohttp

log = logging.getLogger(__name__)


#: What to do about a registry certificate nothing trusts.
_CERT_HINT = (
    "for a registry with a self-signed or private certificate, trust its CA "
    "(SSL_CERT_FILE=CA.pem) or pass --insecure-registry HOST[:PORT]"
)


_Response = http.SmallResponse


class RegistryClient:
    """A distribution-API client for one engine: one session, one auth cache.

    ``endpoint_overrides`` maps a registry name to a base URL, e.g.
    ``{"docker.io": "http://127.0.0.1:5000"}``: for the offline lab and tests, where a local
    registry stands in for Docker Hub.

    ``hosts`` is the engine's host-health record (a fresh one on ``clock`` if not given):
    manifest and token requests report to it, blob sources order their endpoints by it,
    and a transfer reports blob failures to the same one (``client.hosts``).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: Config,
        *,
        docker_config_dir: Path | None = None,
        clock: Clock | None = None,
        endpoint_overrides: Mapping[str, str] | None = None,
        hosts: HostHealth | None = None,
    ) -> None:
        self._session = session
        self._config = config
        self._docker_config_dir = docker_config_dir
        self._clock: Clock = clock or SystemClock()
        #: which host to try first: shared with the engine's transfers
        self.hosts = hosts or HostHealth(self._clock)
        self._overrides = {k: v.rstrip("/") for k, v in (endpoint_overrides or {}).items()}
        self._credentials: dict[str, Credentials] | None = None
        self._challenges: dict[str, Challenge | None] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: insecure host → "https" or "http", decided by one probe per host (``_probe``)
        self._schemes: dict[str, str] = {}
        self._probe_locks: dict[str, asyncio.Lock] = {}

    # ---- where to talk to -------------------------------------------------------------

    def is_insecure(self, host: str) -> bool:
        """Is this host[:port] an insecure registry? As dockerd: listed, or loopback.

        An insecure registry is spoken to as dockerd does: HTTPS without certificate
        verification, or plain HTTP when it does not speak TLS (see ``_probe``).
        """
        hostname = urlsplit(f"//{host}").hostname or host
        for entry in self._config.insecure_registries:
            entry = entry.strip().rstrip("/")
            if "://" in entry:
                entry = urlsplit(entry).netloc
            if entry in (host, hostname):
                return True
            if "/" in entry:  # a CIDR, as dockerd allows
                try:
                    if ipaddress.ip_address(hostname) in ipaddress.ip_network(entry, False):
                        return True
                except ValueError:
                    pass
        if hostname == "localhost":
            return True
        try:
            return ipaddress.ip_address(hostname).is_loopback
        except ValueError:
            return False

    def origin_url(self, ref: Reference) -> str:
        """The base URL (scheme://host[:port]) of the reference's own registry.

        A secure registry is HTTPS. An insecure one is what its probe decided; before the
        probe (which every request path runs first, see ``_probed_origin``) it reads as
        plain HTTP.
        """
        if ref.registry in self._overrides:
            return self._overrides[ref.registry]
        host = ref.api_host
        if not self.is_insecure(host):
            return f"https://{host}"
        return f"{self._schemes.get(host, 'http')}://{host}"

    def verify_tls(self, url: str) -> bool:
        """Verify the certificate of ``url``? Not for HTTPS to an insecure registry's host."""
        parts = urlsplit(url)
        return not (parts.scheme == "https" and self.is_insecure(host_of(url)))

    async def _probed_origin(self, ref: Reference) -> str:
        """``origin_url`` after the host's probe; raises the probe's error if undecided."""
        host = ref.api_host
        if ref.registry not in self._overrides and self.is_insecure(host):
            await self._probe(host)
        return self.origin_url(ref)

    async def _probe(self, host: str) -> None:
        """Decide, once per host, how to speak to an insecure registry, as dockerd does.

        ``GET https://host/v2/`` without certificate verification: any HTTP answer means
        HTTPS. A TLS handshake the server does not speak (it answers in plain HTTP, or
        hangs up) means plain HTTP. Both are remembered. Anything else (refused, timed
        out) decides nothing and is raised as that request's error, so the probe never
        costs an attempt of its own.
        """
        if host in self._schemes:
            return
        async with self._probe_locks.setdefault(host, asyncio.Lock()):
            if host in self._schemes:
                return
            tls = await http.speaks_tls(self._session, f"https://{host}/v2/")
            self._schemes[host] = "https" if tls else "http"
            if tls:
                log.info("insecure registry %s speaks TLS: HTTPS without verification", host)
            else:
                log.info("insecure registry %s does not speak TLS: using plain HTTP", host)

    def mirror_urls(self, ref: Reference) -> list[str]:
        """The configured mirrors (Docker Hub images only, as dockerd), in config order."""
        if not ref.is_docker_hub:
            return []
        return [m.strip().rstrip("/") for m in self._config.registry_mirrors if m.strip()]

    def base_urls(self, ref: Reference) -> list[str]:
        """Mirrors first, then the origin, as ``hosts`` orders them for blobs: a host that
        failed to connect lately goes to the back, one that ignored Range before it."""
        return self.hosts.order_urls([*self.mirror_urls(ref), self.origin_url(ref)])

    def note_failure(self, url: str) -> None:
        """The host of ``url`` failed to connect: try it after the others for now."""
        self.hosts.failed(host_of(url))

    def note_success(self, url: str) -> None:
        """The host of ``url`` served us well again: restore its configured place."""
        self.hosts.succeeded(host_of(url))

    def _policy(self, what: str, *, attempts: int | None = None) -> AttemptPolicy:
        """The engine's attempt policy for one request (``attempts`` overrides the budget)."""
        budget = AttemptBudget(attempts or self._config.max_download_attempts)
        return AttemptPolicy(what, budget, LinearDelay(self._config.retry_delay))

    def _note(self, host: str, error: ResumerError) -> None:
        """Feed the host-health record with a failed request's error."""
        if isinstance(error, ConnectFailedError):
            self.hosts.failed(host)

    # ---- auth ---------------------------------------------------------------------------

    def _creds_for(self, host: str) -> Credentials | None:
        if self._credentials is None:
            self._credentials = load_docker_credentials(self._docker_config_dir)
        creds = self._credentials.get(_hub_key(host))
        if creds is None and host.endswith(":443"):
            creds = self._credentials.get(_hub_key(host[: -len(":443")]))
        return creds

    def _lock(self, host: str, scope: str) -> asyncio.Lock:
        return self._locks.setdefault((host, scope), asyncio.Lock())

    async def auth_headers(self, host: str, scope: str, *, retry: bool = True) -> dict[str, str]:
        """The Authorization for a request to ``host``, from what its challenge asked for.

        A host whose challenge is not known yet gets no header: its first 401 teaches us.
        ``retry``: a token request gets its own attempt policy; False when it is part of
        an attempt already under one (a manifest GET), or must not wait (a mirror).
        """
        challenge = self._challenges.get(host)
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            creds = self._creds_for(host)
            if creds and creds.username:
                return {"Authorization": _basic(creds.username, creds.password)}
            return {}
        if challenge.scheme == "bearer":
            async with self._lock(host, scope):
                token = self._tokens.get((host, scope))
                if token is None or token.expires_at - self._clock.monotonic() < _TOKEN_MARGIN:
                    token = await self._fetch_token(host, scope, challenge, retry=retry)
            return {"Authorization": f"Bearer {token.value}"}
        return {}

    async def refresh_auth(
        self,
        host: str,
        scope: str,
        challenge_header: str | None,
        sent: Mapping[str, str],
        *,
        retry: bool = True,
    ) -> bool:
        """After a 401: learn the challenge and get fresh credentials.

        True when the next request will carry something new; False when there is nothing
        left to try (no usable challenge, no credentials, or the server refused them).
        ``retry`` as for ``auth_headers``.
        """
        challenges = parse_challenges(challenge_header or "")
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        # Prefer Bearer: it is what registries with both expect clients to use.
        usable.sort(key=lambda c: c.scheme != "bearer")
        if not usable:
            log.info("refused by %s, without a usable challenge", host)
            return False
        challenge = usable[0]
        self._challenges[host] = challenge
        if challenge.scheme == "basic":
            creds = self._creds_for(host)
            if not creds or not creds.username:
                return False
            return sent.get("Authorization") != _basic(creds.username, creds.password)
        if "realm" not in challenge.params:
            raise RegistryError(f"{host}: Bearer challenge without a realm")
        async with self._lock(host, scope):
            current = self._tokens.get((host, scope))
            # Another transfer may have refreshed while this one waited for the lock.
            if (
                current is not None
                and sent.get("Authorization") != f"Bearer {current.value}"
                and current.expires_at - self._clock.monotonic() >= _TOKEN_MARGIN
            ):
                return True
            await self._fetch_token(host, scope, challenge, retry=retry)
        return True

    async def _fetch_token(
        self, host: str, scope: str, challenge: Challenge, *, retry: bool
    ) -> _Token:
        """A token for ``scope`` at ``host`` from the challenge's realm; with ``retry``,
        under an attempt policy of its own (else one request: its caller's attempt)."""
        realm = challenge.params.get("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise RegistryError(f"{host}: token realm {redact_url(realm)!r} is not an HTTP URL")

        async def once(_attempt: int = 1) -> _Token:
            return await self._token_once(host, scope, challenge, realm)

        if not retry:
            return await once()
        policy = self._policy(f"token for {scope} from {redact_url(realm)}")
        return await run(policy, once, self._clock, on_failure=lambda e: self._note(host, e))

    async def _token_once(self, host: str, scope: str, challenge: Challenge, realm: str) -> _Token:
        """One token request (GET, or POST for an identity token) and its answer."""
        service = challenge.params.get("service")
        creds = self._creds_for(host)
        if creds and creds.identity_token:
            # An identity token is an OAuth2 refresh token: POST it, as docker login's
            # tokens require.
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": "resumer",
                "scope": scope,
            }
            if service:
                form["service"] = service
            resp = await http.post_form(
                self._session,
                realm,
                form,
                limit=_TOKEN_LIMIT,
                stall_timeout=self._config.stall_timeout,
            )
        else:
            params = {"scope": scope}
            if service:
                params["service"] = service
            headers = {}
            if creds and creds.username:
                headers["Authorization"] = _basic(creds.username, creds.password)
            url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(params)}"
            resp = await http.get_small(
                self._session,
                url,
                headers,
                limit=_TOKEN_LIMIT,
                stall_timeout=self._config.stall_timeout,
            )
        where = f"token server {redact_url(realm)}"
        log.debug("token request to %s for %s: HTTP %d", redact_url(realm), scope, resp.status)
        if resp.status in (401, 403):
            # The credentials themselves were refused: final, no refresh can help.
            raise AccessDeniedError(
                f"{host}: the {where} refused "
                f"{'the credentials from config.json' if creds else 'anonymous access'} "
                f"for {scope} (HTTP {resp.status})",
                status=resp.status,
            )
        _check_status(resp, where, self._clock)
        return self._keep_token(host, scope, where, resp.body)

    def _keep_token(self, host: str, scope: str, where: str, body: bytes) -> _Token:
        try:
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            expires_in = doc.get("expires_in", 0)
            if not isinstance(value, str) or not value:
                raise ValueError("no token")
            lifetime = float(expires_in) if isinstance(expires_in, int | float) else 0.0
        except (ValueError, AttributeError) as exc:
            raise RegistryError(f"{host}: the {where} sent no usable token") from exc
        token = _Token(value, self._clock.monotonic() + max(lifetime, _TOKEN_MIN_LIFETIME))
        self._tokens[(host, scope)] = token
        return token

    # ---- small GETs -------------------------------------------------------------------

    async def _get_small(
        self,
        ref: Reference,
        kind: str,
        ident: str,
        *,
        accept: str | None,
        limit: int,
    ) -> tuple[_Response, str]:
        """GET a manifest or small blob: each mirror once, then the origin; and the base
        URL that served it.

        As dockerd, any error of a mirror moves on to the next (it gets one attempt, and a
        token refresh that is not one); the origin decides, with the engine's attempt
        budget and delays.
        """
        headers = {"Accept-Encoding": "identity"}
        if accept:
            headers["Accept"] = accept
        what = _what(kind, ref, ident)
        path = f"/v2/{ref.repository}/{kind}/{ident}"
        for base in self.hosts.order_urls(self.mirror_urls(ref), ranged=False):
            policy = self._policy(what, attempts=1)
            try:
                return await self._get_under(policy, ref, base, path, headers, limit)
            except ResumerError as exc:
                log.info("mirror %s failed (%s); trying the next", redact_url(base), exc)
        origin = self.origin_url(ref)
        return await self._get_under(self._policy(what), ref, origin, path, headers, limit)

    async def _get_under(
        self,
        policy: AttemptPolicy,
        ref: Reference,
        base: str,
        path: str,
        headers: Mapping[str, str],
        limit: int,
    ) -> tuple[_Response, str]:
        """GET ``base + path`` until it answers 200 or ``policy`` gives up."""
        host = host_of(base)
        scope = _pull_scope(ref)
        probe = base == self.origin_url(ref)
        sent: dict[str, str] = {}

        async def attempt(_n: int) -> tuple[_Response, str]:
            nonlocal sent
            # The probe is part of the attempt: its failure is this attempt's.
            served_by = await self._probed_origin(ref) if probe else base
            url = served_by + path
            # A token fetched here is part of this attempt, under this policy.
            sent = {**headers, **await self.auth_headers(host, scope, retry=False)}
            resp = await http.get_small(
                self._session,
                url,
                sent,
                limit=limit,
                verify_tls=self.verify_tls(url),
                cert_hint=_CERT_HINT,
                stall_timeout=self._config.stall_timeout,
            )
            _check_status(resp, redact_url(url), self._clock)
            self.hosts.succeeded(host)
            return resp, served_by

        async def refresh(refused: ResumerError) -> bool:
            challenge = getattr(refused, "challenge", None)
            return await self.refresh_auth(host, scope, challenge, sent, retry=False)

        return await run(
            policy, attempt, self._clock, refresh=refresh, on_failure=lambda e: self._note(host, e)
        )

    # ---- resolve ------------------------------------------------------------------------

    async def resolve(self, ref: Reference | str, platform: str | None = None) -> ResolvedImage:
        """Resolve a reference to its manifest, config and ordered layers for one platform."""
        if isinstance(ref, str):
            ref = parse_reference(ref)
        wanted_text = platform or self._config.platform
        explicit = wanted_text is not None
        wanted = parse_platform(wanted_text) if wanted_text else host_platform_default()

        resp, base = await self._get_small(
            ref, "manifests", ref.manifest_ref, accept=MANIFEST_ACCEPT, limit=MAX_MANIFEST_BYTES
        )
        what = str(ref)
        top_digest = _check_manifest_digest(what, resp, ref.digest)
        doc = _load_json(what, resp.body)
        media_type = _media_type(what, doc, resp.headers.get("Content-Type", ""))

        index: tuple[bytes, str, str] | None = None
        chosen_platform: Platform | None = None
        if media_type in _INDEXES:
            index = (resp.body, top_digest, media_type)
            desc, chosen_platform = _pick_platform(what, doc, wanted)
            child = dataclasses.replace(ref, digest=desc["digest"])
            resp, base = await self._get_small(
                child,
                "manifests",
                desc["digest"],
                accept=MANIFEST_ACCEPT,
                limit=MAX_MANIFEST_BYTES,
            )
            what = f"{ref.name}@{desc['digest']}"
            manifest_digest = _check_manifest_digest(what, resp, desc["digest"])
            if isinstance(desc.get("size"), int) and desc["size"] != len(resp.body):
                raise RegistryError(
                    f"manifest {what}: {len(resp.body)} bytes, the index says {desc['size']}"
                )
            doc = _load_json(what, resp.body)
            media_type = _media_type(what, doc, resp.headers.get("Content-Type", ""))
            if media_type not in _MANIFESTS:
                raise RegistryError(f"manifest {what}: the index points to a {media_type}")
        else:
            manifest_digest = top_digest

        config_desc, layers = _parse_image_manifest(what, doc)
        config_resp, _ = await self._get_small(
            ref,
            "blobs",
            config_desc.digest,
            accept=None,
            limit=min(config_desc.size, MAX_CONFIG_BYTES)
            if config_desc.size > 0
            else MAX_CONFIG_BYTES,
        )
        config_bytes = config_resp.body
        if "sha256:" + hashlib.sha256(config_bytes).hexdigest() != config_desc.digest:
            raise DigestMismatchError(
                f"config {config_desc.digest} of {what}: content does not match its digest",
                resumed=False,
            )
        diff_ids, config_platform = _parse_config(what, config_desc.digest, config_bytes)
        if len(diff_ids) != len(layers):
            raise RegistryError(
                f"manifest {what}: {len(layers)} layers but the config lists "
                f"{len(diff_ids)} diff_ids"
            )
        if chosen_platform is None:
            chosen_platform = config_platform
            if explicit and not any(
                _matches(config_platform, c, any_variant=not c.variant)
                for c in _platform_candidates(wanted)
            ):
                raise PlatformNotFoundError(
                    f"{ref}: no image for platform {wanted}; available: {config_platform}"
                )
        log.info("resolved %s to %s via %s", ref, manifest_digest, redact_url(base))
        return ResolvedImage(
            reference=ref,
            manifest=resp.body,
            manifest_digest=manifest_digest,
            manifest_media_type=media_type,
            config=config_bytes,
            config_digest=config_desc.digest,
            config_media_type=config_desc.media_type,
            layers=tuple(layers),
            diff_ids=tuple(diff_ids),
            platform=str(chosen_platform),
            index=index[0] if index else None,
            index_digest=index[1] if index else None,
            index_media_type=index[2] if index else None,
            served_by=redact_url(base),
        )

    # ---- layer blobs --------------------------------------------------------------------

    def blob_source(self, ref: Reference | str, digest: str) -> RegistryBlobSource:
        """A ``Source`` for one blob of ``ref``'s repository: mirrors first, then the origin."""
        if isinstance(ref, str):
            ref = parse_reference(ref)
        if not _DIGEST.match(digest):
            raise RegistryError(f"invalid blob digest {digest!r}")
        return RegistryBlobSource(self, ref, digest)


class RegistryBlobSource:
    """Where one layer blob lives: ``/v2/<repo>/blobs/<digest>`` on each mirror and the origin.

    Endpoints come in the order of the client's ``hosts`` (its engine's HostHealth):
    hosts that failed to connect lately last, hosts that ignored Range before them.
    The transfer loop should, on every attempt:

    1. call ``endpoints()`` (fresh tokens, hosts in health order) and use the first;
    2. report to ``client.hosts`` what it learnt of the endpoint's host: ``failed`` (no
       connection), ``range_ignored`` (a 200 to a resumed request), ``succeeded``;
    3. on a 401/403, refresh as its ``AttemptPolicy`` says (REFRESH): call
       ``refresh_auth(endpoint, exc.challenge)``; if True, try again without counting an
       attempt, else ask the policy's ``refused()``.
    """

    def __init__(self, client: RegistryClient, ref: Reference, digest: str) -> None:
        self._client = client
        self.reference = ref
        self.digest = digest
        self._scope = _pull_scope(ref)

    @property
    def display(self) -> str:
        return f"{self.reference.name}@{self.digest}"

    async def endpoints(self) -> list[Endpoint]:
        out: list[Endpoint] = []
        bases = self._client.base_urls(self.reference)
        origin = self._client.origin_url(self.reference)
        for i, base in enumerate(bases):
            last = i == len(bases) - 1
            host = host_of(base)
            if base == origin:
                try:
                    base = await self._client._probed_origin(self.reference)
                except ResumerError as exc:
                    # Undecided (refused, timed out): try HTTPS, dockerd's first choice; this
                    # attempt fails or succeeds on its own, and the next one probes again.
                    log.info("probing %s failed this attempt: %s", host, exc)
                    self._client._note(host, exc)
                    base = f"https://{host}"
            try:
                # The last endpoint's token is worth waiting for (retried within the
                # budget): without it the attempt has nowhere to go.
                headers = await self._client.auth_headers(host, self._scope, retry=last)
            except ResumerError as exc:
                self._client._note(host, exc)
                if last:
                    raise
                # A mirror whose token server is down or refuses us must not block the rest.
                log.info("skipping %s this attempt: %s", redact_url(base), exc)
                continue
            url = f"{base}/v2/{self.reference.repository}/blobs/{self.digest}"
            out.append(Endpoint(url, headers, host, verify_tls=self._client.verify_tls(base)))
        return out

    async def refresh_auth(self, endpoint: Endpoint, challenge: str | None) -> bool:
        return await self._client.refresh_auth(
            endpoint.host, self._scope, challenge, endpoint.headers
        )

    def note_failure(self, endpoint: Endpoint) -> None:
        """This endpoint's host failed to connect: every source sharing the client's
        ``hosts`` tries it after the others for now."""
        self._client.note_failure(endpoint.url)

    def note_success(self, endpoint: Endpoint) -> None:
        self._client.note_success(endpoint.url)


def _registry_message(body: bytes) -> str:
    """The distribution API's ``{"errors": [{"code", "message"}]}``, for error texts."""
    try:
        errors = json.loads(body).get("errors")
        first = errors[0]
        return f": {first.get('code', '')} {first.get('message', '')}".rstrip()
    except (ValueError, AttributeError, TypeError, IndexError, KeyError):
        return ""


def _check_status(resp: _Response, where: str, clock: Clock) -> None:
    """Raise what a small GET's status means (http.status_error); only a 200 is an answer."""
    error = http.status_error(
        resp.status, where, resp.headers, clock, detail=_registry_message(resp.body)
    )
    if error is not None:
        raise error
    if resp.status != 200:
        raise BrokenServerError(f"{where}: HTTP {resp.status} to a request without Range")


def _what(kind: str, ref: Reference, ident: str) -> str:
    """What a small GET is for, in messages: ``manifest host/repo:tag`` or ``blob …@digest``."""
    noun = "manifest" if kind == "manifests" else "blob"
    return f"{noun} {ref.name}{'@' if ':' in ident else ':'}{ident}"

