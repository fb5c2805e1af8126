"""The mirror's HTTP API: the read-only half of the OCI distribution spec.

Every route answers with OCI error JSON when it cannot serve, so that a client (dockerd,
containerd, podman) falls through to its next endpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web

from ..engine import Engine

#: the API version header every /v2/ answer carries (docker checks it)
_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


@dataclass(frozen=True)
class MirrorSettings:
    """What the mirror needs beyond the engine's Config."""

    #: the registry a request without ``?ns=`` goes to (dockerd and podman send none)
    upstream: str = "docker.io"


def oci_error(status: int, code: str, message: str) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=_API_VERSION,
    )


def mirror_app(engine: Engine, settings: MirrorSettings) -> web.Application:
    app = web.Application()

    async def base(_: web.Request) -> web.Response:
        return web.Response(body=b"{}", content_type="application/json", headers=_API_VERSION)

    async def unknown(request: web.Request) -> web.Response:
        return oci_error(404, "NAME_UNKNOWN", f"{request.path}: not served by this mirror")

    app.router.add_get("/v2/", base)
    app.router.add_route("*", "/{tail:.*}", unknown)
    return app
