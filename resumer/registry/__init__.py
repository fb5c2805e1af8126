"""The distribution API: references, manifests, platforms, token auth and mirrors.

What lives here, one module each, each importing only those above it:

- ``reference.py``: ``Reference`` / ``parse_reference``, image references normalised the
  way Docker does it (``alpine`` → ``docker.io/library/alpine:latest``).
- ``platform.py``: ``Platform``, normalised, parsed and matched as containerd does.
- ``manifest.py``: media types; manifests, indexes, configs and descriptors parsed and
  validated; ``ResolvedImage`` and ``LayerDescriptor``.
- ``auth.py``: ``WWW-Authenticate`` challenges and Basic credentials and identity tokens
  from Docker's ``config.json``.
- ``client.py``: ``RegistryClient``. ``resolve``: manifest (and index) → the platform's
  manifest → the config blob, all small, all verified by digest, returned as a
  ``ResolvedImage``. ``blob_source``: a ``RegistryBlobSource`` for one layer blob. It names
  the registry's blob URL on each mirror and on the origin, with a fresh ``Authorization``
  header per attempt; ``fetch.py`` does the actual Range GET. Bearer tokens from the
  ``WWW-Authenticate`` challenge, cached per (host, scope).

Every request goes through ``http.py`` (redirects, status → error, aiohttp's exceptions
mapped into ``resumer.errors``) and is retried by ``retry.AttemptPolicy`` with the
engine's ``max-download-attempts`` and ``retry-delay``, as blobs are. Which host to try
first is the engine's ``hosts.HostHealth``, which these requests feed too. Secrets
(tokens, passwords, pre-signed URLs) never reach a log record: only ``redact_url`` output
and hosts are logged.

The names below are re-exported so that ``from resumer.registry import X`` keeps working;
inside the product, import from the submodule.
"""

from ..hosts import DEMOTION_SECONDS  # re-exported: it lives in hosts.py
from .auth import Challenge, Credentials, load_docker_credentials, parse_challenges
from .client import RegistryBlobSource, RegistryClient
from .manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    LayerDescriptor,
    ResolvedImage,
)
from .platform import Platform, host_platform_default, normalize_platform, parse_platform
from .reference import DOCKER_HUB, DOCKER_HUB_API, Reference, parse_reference

__all__ = [
    "DEMOTION_SECONDS",
    "DOCKER_HUB",
    "DOCKER_HUB_API",
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "MANIFEST_ACCEPT",
    "MAX_CONFIG_BYTES",
    "MAX_MANIFEST_BYTES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Challenge",
    "Credentials",
    "LayerDescriptor",
    "Platform",
    "Reference",
    "RegistryBlobSource",
    "RegistryClient",
    "ResolvedImage",
    "host_platform_default",
    "load_docker_credentials",
    "normalize_platform",
    "parse_challenges",
    "parse_platform",
    "parse_reference",
]
