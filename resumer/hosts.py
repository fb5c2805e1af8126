"""One host-health record per engine, shared by blob transfers and registry requests.

Two things are remembered per host (``host[:port]``, as ``Endpoint.host`` names it):

- it failed to connect: for ``demotion_seconds`` it is tried after the hosts that did
  not, the most recent failure last. It is never dropped: when every host failed lately,
  the one that failed longest ago goes first. A success restores its place at once.
- it ignored Range (a 200 to a resumed request): for blobs it is preferred after every
  host that connects, for ``range_seconds``. A success does not clear this: a manifest
  GET that worked says nothing about Range.

The order is otherwise the configured one (stable sort): mirrors first, origin last.
Times come from the injected clock, so tests move them by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

from .clock import Clock

log = logging.getLogger(__name__)

#: How long a host that failed to connect stays behind the others: a mirror that was
#: down for a minute should not be shunned for the whole pull.
DEMOTION_SECONDS = 300.0
#: How long a host that ignored Range stays behind for blobs: a server's configuration,
#: which changes rarely, but a daemon runs for months.
RANGE_IGNORED_SECONDS = 3600.0


class HasHost(Protocol):
    @property
    def host(self) -> str: ...


E = TypeVar("E", bound=HasHost)
T = TypeVar("T")


def host_of(url: str) -> str:
    """``host[:port]`` of a URL, without userinfo: the key of the health record."""
    return urlsplit(url).netloc.rpartition("@")[2]


class HostHealth:
    """Which hosts to try first. One per engine; every registry client and transfer of
    that engine reports to it, so one layer's dead mirror is skipped by the next."""

    def __init__(
        self,
        clock: Clock,
        *,
        demotion_seconds: float = DEMOTION_SECONDS,
        range_seconds: float = RANGE_IGNORED_SECONDS,
    ) -> None:
        self._clock = clock
        self._demotion = demotion_seconds
        self._range = range_seconds
        #: host → monotonic time of its last failure to connect
        self._failed: dict[str, float] = {}
        #: host → monotonic time it last ignored Range
        self._ignores_range: dict[str, float] = {}

    # ---- what happened ----------------------------------------------------------------

    def failed(self, host: str) -> None:
        """``host`` did not connect (or answered nothing): try it after the others."""
        self._failed[host] = self._clock.monotonic()
        log.info("trying %s after the other hosts for now: it failed to connect", host)

    def range_ignored(self, host: str) -> None:
        """``host`` answered a resumed request with the whole blob: prefer others for blobs."""
        self._ignores_range[host] = self._clock.monotonic()

    def succeeded(self, host: str) -> None:
        """``host`` answered: back to its configured place (Range memory stays)."""
        self._failed.pop(host, None)

    # ---- what to do -------------------------------------------------------------------

    def order(self, endpoints: Iterable[E], *, ranged: bool = True) -> list[E]:
        """``endpoints`` best first. ``ranged``: the request may resume (a blob), so hosts
        that ignored Range go after those that honour it."""
        return self.order_by(endpoints, lambda e: e.host, ranged=ranged)

    def order_urls(self, urls: Iterable[str], *, ranged: bool = True) -> list[str]:
        """Base URLs best first, by their host."""
        return self.order_by(urls, host_of, ranged=ranged)

    def order_by(self, items: Iterable[T], host: Callable[[T], str], *, ranged: bool) -> list[T]:
        self._forget_old()
        failed, ignores = self._failed, self._ignores_range
        never = float("-inf")
        # Healthy first; then (blobs) those that ignore Range; then the failed ones, the
        # most recent failure last. sorted() is stable: ties keep the configured order.
        return sorted(
            items,
            key=lambda item: (
                failed.get(host(item), never),
                ranged and host(item) in ignores,
            ),
        )

    def ignores_range(self, host: str) -> bool:
        """Whether ``host`` lately answered a resumed request with the whole blob."""
        self._forget_old()
        return host in self._ignores_range

    def is_demoted(self, host: str) -> bool:
        """Whether ``host`` failed to connect lately (for logs and tests)."""
        self._forget_old()
        return host in self._failed

    def _forget_old(self) -> None:
        now = self._clock.monotonic()
        self._failed = {h: t for h, t in self._failed.items() if now - t < self._demotion}
        self._ignores_range = {
            h: t for h, t in self._ignores_range.items() if now - t < self._range
        }
