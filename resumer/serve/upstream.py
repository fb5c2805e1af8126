"""The mirror's requests upstream that are not blob transfers: a manifest, once, and a
blob's size when no manifest the mirror served told it.

Each goes to the configured mirrors, then the origin, with one attempt each (a token
refresh is not one): a client waits on the answer, and when the upstream does not answer
the mirror has the last known digest to serve instead. Credentials come from the
engine's RegistryClient and stay in these requests; nothing of the upstream's answer but
the manifest's bytes and media type reaches a client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass

import aiohttp

from ..errors import DigestMismatchError, ResumerError, StallError
from ..http import SmallResponse
from ..registry import MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, Reference, RegistryClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Manifest:
    body: bytes
    digest: str
    media_type: str


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def media_type_of(body: bytes, content_type: str = "") -> str:
    """The manifest's own ``mediaType``, else the upstream's Content-Type; else OCI's."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("mediaType"), str):
        return str(doc["mediaType"])
    ctype = content_type.split(";", 1)[0].strip()
    if ctype and ctype not in ("application/json", "text/plain", "application/octet-stream"):
        return ctype
    return "application/vnd.oci.image.manifest.v1+json"


async def get_manifest(
    client: RegistryClient, ref: Reference, ident: str, *, timeout: float
) -> Manifest:
    """The manifest ``ident`` (a tag or a digest) of ``ref``'s repository from upstream.

    A digest is checked against the bytes (``DigestMismatchError``), so is a
    Docker-Content-Digest the upstream sends. Errors are the registry client's
    (``NotFoundError``, ``TransientError``, ``BudgetExhaustedError`` …); no answer
    within ``timeout`` seconds is a ``StallError``.
    """
    headers = {"Accept": MANIFEST_ACCEPT, "Accept-Encoding": "identity"}
    path = f"/v2/{ref.repository}/manifests/{ident}"
    what = f"manifest {ref.name}{'@' if ':' in ident else ':'}{ident}"
    try:
        async with asyncio.timeout(timeout):
            resp, _ = await _get_once(client, ref, path, headers, what)
    except TimeoutError:
        raise StallError(f"{what}: no answer from upstream in {timeout:g} s") from None
    digest = sha256(resp.body)
    if ":" in ident and digest != ident:
        raise DigestMismatchError(f"{what}: content hashes to {digest}", resumed=False)
    sent = resp.headers.get("Docker-Content-Digest", "").strip()
    if sent and sent != digest:
        raise DigestMismatchError(
            f"{what}: content hashes to {digest} but upstream says {sent}", resumed=False
        )
    return Manifest(
        resp.body, digest, media_type_of(resp.body, resp.headers.get("Content-Type", ""))
    )


async def _get_once(
    client: RegistryClient, ref: Reference, path: str, headers: dict[str, str], what: str
) -> tuple[SmallResponse, str]:
    """Each mirror once, then the origin once: the first 200 and who served it."""
    last: ResumerError | None = None
    for base in [*client.mirror_urls(ref), client.origin_url(ref)]:
        policy = client._policy(what, attempts=1)
        try:
            return await client._get_under(policy, ref, base, path, headers, MAX_MANIFEST_BYTES)
        except ResumerError as exc:
            last = exc
            log.info("%s: %s failed: %s", what, base, exc)
    assert last is not None
    raise last


async def blob_size(
    client: RegistryClient, ref: Reference, digest: str, *, timeout: float
) -> int | None:
    """The blob's size from a HEAD upstream (its Content-Length), or None if no endpoint
    says (a redirect, an error, no answer): then the client gets it chunked."""
    try:
        async with asyncio.timeout(timeout):
            for endpoint in await client.blob_source(ref, digest).endpoints():
                try:
                    async with client._session.head(
                        endpoint.url,
                        headers={**endpoint.headers, "Accept-Encoding": "identity"},
                        allow_redirects=False,
                        ssl=endpoint.verify_tls,
                    ) as resp:
                        length = resp.headers.get("Content-Length", "")
                        if resp.status == 200 and length.isdigit():
                            return int(length)
                except aiohttp.ClientError as exc:
                    log.info("HEAD %s@%s: %s", ref.name, digest, exc)
    except (TimeoutError, ResumerError) as exc:
        log.info("HEAD %s@%s: no size (%s)", ref.name, digest, exc)
    return None
