"""A fault-injecting TCP proxy for tests, benchmarks and the demo.

`FaultProxy` listens on 127.0.0.1 and forwards every connection to one target. On the
server→client direction it applies a seeded `Faults` schedule: RST cuts after N bytes,
stalls (a black hole that keeps the socket open), a shared token-bucket rate limit, a
one-way latency, and periodic outages in which every connection is reset and new ones
are refused. Every decision drawn from the RNG is written to the event log, so a run can
be replayed from its seed, and the counters say how many bytes really crossed the "wire".

Run standalone for subprocess benchmarks::

    python -m resumer.lab.proxy --target 127.0.0.1:5000 --seed 1 --cut-after 1000:90000

It prints ``listening on 127.0.0.1:PORT`` once ready and, on SIGTERM, one JSON line with
the counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import fcntl
import json
import random
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import TracebackType

from resumer.clock import Clock, SystemClock

__all__ = ["Counters", "Event", "EventKind", "FaultProxy", "Faults", "main"]

#: Read size per piece; large reads are what make loopback forwarding fast.
READ_SIZE = 256 * 1024
#: Pieces buffered per direction between the reader and the (delaying) writer.
QUEUE_PIECES = 16
#: How long a cut waits for the kernel to hand its last bytes to the client before the RST.
CUT_FLUSH_TIMEOUT = 5.0


@dataclass(frozen=True)
class Faults:
    """The fault schedule; all byte offsets count server→client bytes of one connection.

    Cut points: connection i (0-based, in accept order) is cut at ``cut_at[i]`` while the
    explicit list lasts, then at a point drawn uniformly from ``cut_after`` (inclusive),
    or never if that is None. Stall points work the same way with ``stall_at`` and
    ``stall_after``; a stall lasts ``stall_for`` seconds (on the injected clock), or
    forever if None. A connection with both a cut and a stall point meets them in byte
    order.
    """

    cut_at: tuple[int, ...] = ()
    cut_after: tuple[int, int] | None = None
    stall_at: tuple[int, ...] = ()
    stall_after: tuple[int, int] | None = None
    stall_for: float | None = None
    #: server→client bytes per second, shared by all connections like one link; None: no limit.
    rate: float | None = None
    #: Burst allowance of the rate limiter, in seconds of `rate`.
    burst: float = 0.02
    #: One-way delay in seconds, applied to every piece in both directions.
    latency: float = 0.0
    #: Every `outage_every` seconds, `outage_for` seconds with every connection reset.
    outage_every: float | None = None
    outage_for: float = 1.0

    def __post_init__(self) -> None:
        for name, span in (("cut_after", self.cut_after), ("stall_after", self.stall_after)):
            if span is not None and not 0 <= span[0] <= span[1]:
                raise ValueError(f"{name} must be MIN:MAX with 0 <= MIN <= MAX, got {span}")
        if any(n < 0 for n in (*self.cut_at, *self.stall_at)):
            raise ValueError("cut and stall points must be >= 0")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {self.rate}")
        if self.latency < 0:
            raise ValueError(f"latency must be >= 0, got {self.latency}")
        if self.outage_every is not None and not 0 < self.outage_for < self.outage_every:
            raise ValueError("outage_for must be > 0 and shorter than outage_every")


class EventKind(enum.Enum):
    """What happened; PLAN_* events are the RNG's decisions, the rest are what followed."""

    ACCEPT = "accept"  # a client connected
    PLAN_CUT = "plan-cut"  # this connection will be cut at `offset`
    PLAN_STALL = "plan-stall"  # this connection will stall at `offset`
    UPSTREAM_FAILED = "upstream-failed"  # the target refused or failed
    CUT = "cut"  # RST sent to the client at `offset`
    STALL = "stall"  # black hole started at `offset`
    RESUME = "resume"  # a timed stall ended
    SERVER_EOF = "server-eof"  # the target finished sending
    CLIENT_EOF = "client-eof"  # the client finished sending
    CLIENT_GONE = "client-gone"  # the client reset or vanished
    CLOSE = "close"  # the connection is over
    REFUSED = "refused"  # reset at accept, during an outage
    OUTAGE_START = "outage-start"
    OUTAGE_END = "outage-end"


@dataclass(frozen=True)
class Event:
    """One line of the log. `conn` is -1 for proxy-wide events (outages)."""

    conn: int
    kind: EventKind
    offset: int
    time: float
    detail: str = ""

    def __str__(self) -> str:
        extra = f" {self.detail}" if self.detail else ""
        return f"{self.time:.6f} conn={self.conn} {self.kind.value} @{self.offset}{extra}"


@dataclass
class Counters:
    """Totals since start; `bytes_down` is what benchmarks call bytes on the wire."""

    bytes_down: int = 0  # server→client bytes delivered to clients
    bytes_up: int = 0  # client→server bytes delivered to the target
    connections: int = 0  # connections accepted (including refused ones)
    cuts: int = 0
    stalls: int = 0
    refused: int = 0


class _TokenBucket:
    """A shared rate limit: callers reserve time on one virtual link, in arrival order."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._free_at = 0.0  # loop time at which the link has sent everything reserved

    async def take(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # An idle link may send `burst` seconds' worth at once, never more.
        self._free_at = max(self._free_at, now - self._burst) + n / self._rate
        delay = self._free_at - now
        if delay > 0:
            await asyncio.sleep(delay)

    def piece(self) -> int:
        # Pieces of ~10 ms keep the output smooth instead of 256 KiB bursts.
        return max(1024, min(READ_SIZE, int(self._rate / 100)))


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER(on, 0) makes close() abort instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _unsent(writer: asyncio.StreamWriter) -> int:
    """Bytes not yet acknowledged by the peer: asyncio's buffer plus the kernel's."""
    pending = writer.transport.get_write_buffer_size()
    sock = writer.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return pending
    buf = bytearray(4)
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)  # == SIOCOUTQ on Linux
    except OSError:
        return pending
    return pending + int.from_bytes(buf, sys.byteorder)


class _Cut(Exception):
    """Raised inside a pump when its connection has been cut."""


class _Conn:
    """One proxied connection: two pumps, each a reader task feeding a delaying writer."""

    def __init__(
        self,
        proxy: FaultProxy,
        cid: int,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        cut_at: int | None,
        stall_at: int | None,
    ) -> None:
        self.proxy = proxy
        self.cid = cid
        self.client_r = client_r
        self.client_w = client_w
        self.server_w: asyncio.StreamWriter | None = None
        self.cut_at = cut_at
        self.stall_at = stall_at
        self.sent = 0  # server→client bytes delivered on this connection
        self.open = asyncio.Event()  # cleared while stalled: nothing moves either way
        self.open.set()
        self.cut = False
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        p = self.proxy
        try:
            server_r, self.server_w = await asyncio.open_connection(
                p.target_host, p.target_port, limit=2 * READ_SIZE
            )
        except OSError as exc:
            p._log(self.cid, EventKind.UPSTREAM_FAILED, 0, str(exc))
            self.hard_cut()
            return
        try:
            if self.cut_at == 0:
                await self._cut()
            elif self.stall_at == 0:
                await self._stall()
            if not self.cut:
                self.tasks = [
                    asyncio.create_task(self._pump(self.client_r, self.server_w, up=True)),
                    asyncio.create_task(self._pump(server_r, self.client_w, up=False)),
                ]
                await asyncio.gather(*self.tasks)
        except (_Cut, asyncio.CancelledError):
            pass
        except (OSError, asyncio.IncompleteReadError) as exc:
            p._log(self.cid, EventKind.CLIENT_GONE, self.sent, type(exc).__name__)
            self.hard_cut(log=False)
        finally:
            for task in self.tasks:
                task.cancel()
            if self.tasks:
                # The pumps end before their connection does, so none outlives close().
                await asyncio.wait(self.tasks)
                for task in self.tasks:
                    if not task.cancelled():
                        task.exception()  # the first one was raised by gather above
            for w in (self.client_w, self.server_w):
                if w is not None and not w.transport.is_closing():
                    w.close()
            p._log(self.cid, EventKind.CLOSE, self.sent)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        latency = self.proxy.faults.latency
        # The reader runs ahead of the writer so that a delayed piece does not hold back
        # the ones behind it: latency delays, it does not throttle.
        queue: asyncio.Queue[tuple[float, bytes | Exception]] = asyncio.Queue(QUEUE_PIECES)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                while data := await reader.read(READ_SIZE):
                    await queue.put((loop.time() + latency, data))
            except OSError as exc:
                await queue.put((loop.time(), exc))
            else:
                await queue.put((loop.time() + latency, b""))

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                if isinstance(data, Exception):
                    raise data
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.open.wait()
                if not data:
                    break
                if up:
                    writer.write(data)
                    await writer.drain()
                    self.proxy.counters.bytes_up += len(data)
                else:
                    await self._deliver(data)
            kind = EventKind.CLIENT_EOF if up else EventKind.SERVER_EOF
            self.proxy._log(self.cid, kind, self.sent)
            if writer.can_write_eof() and not writer.transport.is_closing():
                writer.write_eof()
        finally:
            reading.cancel()
            await asyncio.wait([reading])  # owned: it ends before the pump does
            if not reading.cancelled():
                reading.exception()

    async def _deliver(self, data: bytes) -> None:
        """Send server bytes to the client, stopping exactly at the planned offsets."""
        p = self.proxy
        view = memoryview(data)
        while view:
            n = len(view)
            for point in (self.cut_at, self.stall_at):
                if point is not None and point > self.sent:
                    n = min(n, point - self.sent)
            if p._bucket is not None:
                n = min(n, p._bucket.piece())
                await p._bucket.take(n)
            await self.open.wait()
            self.client_w.write(view[:n])
            view = view[n:]
            self.sent += n
            p.counters.bytes_down += n
            await self.client_w.drain()
            if self.sent == self.cut_at:
                await self._cut()
            if self.sent == self.stall_at:
                await self._stall()

    async def _cut(self) -> None:
        # Exactness: the client must hold every byte up to the cut before the RST, and a
        # RST discards whatever the kernel has not yet sent, so wait for it to drain.
        deadline = time.monotonic() + CUT_FLUSH_TIMEOUT
        # The kernel's send queue has no readiness event to wait on, so poll it briefly.
        while _unsent(self.client_w) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        self.proxy.counters.cuts += 1
        self.proxy._log(self.cid, EventKind.CUT, self.sent)
        self.hard_cut(log=False)
        raise _Cut

    async def _stall(self) -> None:
        p = self.proxy
        p.counters.stalls += 1
        duration = p.faults.stall_for
        p._log(self.cid, EventKind.STALL, self.sent, "forever" if duration is None else "")
        self.open.clear()
        if duration is None:
            await asyncio.Event().wait()  # until cut, closed or cancelled
        else:
            await p.clock.sleep(duration)
        self.open.set()
        p._log(self.cid, EventKind.RESUME, self.sent)

    def hard_cut(self, *, log: bool = False, reason: str = "") -> None:
        """RST the client and drop the server side, right now."""
        if self.cut:
            return
        self.cut = True
        if log:
            self.proxy.counters.cuts += 1
            self.proxy._log(self.cid, EventKind.CUT, self.sent, reason)
        _reset(self.client_w)
        if self.server_w is not None:
            self.server_w.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that forwards to one target and injects `faults`.

    Use ``async with FaultProxy(host, port, Faults(...), seed=1) as proxy`` and connect to
    ``proxy.port``; or call `start` and `close` yourself.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        faults: Faults | None = None,
        *,
        seed: int = 0,
        listen_port: int = 0,
        clock: Clock | None = None,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.faults = faults or Faults()
        self.seed = seed
        self.clock: Clock = clock or SystemClock()
        self.counters = Counters()
        self.events: list[Event] = []
        self.port = 0
        self.in_outage = False
        self._listen_port = listen_port
        self._rng = random.Random(seed)
        self._conns: dict[int, _Conn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closing = False
        self._outages: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # set and replaced on every new log line
        self._bucket = (
            _TokenBucket(self.faults.rate, self.faults.burst) if self.faults.rate else None
        )

    async def start(self) -> int:
        """Listen and return the port."""
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self._listen_port, limit=2 * READ_SIZE
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.port == self.target_port and self.target_host in ("127.0.0.1", "localhost"):
            # Each connection would open another to itself until file descriptors run out.
            await self.close()
            raise ValueError(f"proxy would forward to itself (127.0.0.1:{self.port})")
        if self.faults.outage_every is not None:
            self._outages = asyncio.create_task(self._outage_loop())
        return self.port

    async def close(self) -> None:
        """Stop listening, cut what is still open and wait for the connections to end."""
        self._closing = True
        if self._outages is not None:
            self._outages.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._outages
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.hard_cut()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def cut_all(self, reason: str = "cut_all") -> int:
        """RST every open connection now; returns how many were cut."""
        conns = [c for c in self._conns.values() if not c.cut]
        for conn in conns:
            conn.hard_cut(log=True, reason=reason)
        return len(conns)

    def begin_outage(self) -> None:
        """Cut everything and refuse new connections until `end_outage`."""
        self.in_outage = True
        self._log(-1, EventKind.OUTAGE_START, 0)
        self.cut_all("outage")

    def end_outage(self) -> None:
        self.in_outage = False
        self._log(-1, EventKind.OUTAGE_END, 0)

    def schedule(self) -> list[tuple[int, EventKind, int, str]]:
        """The RNG's decisions so far, without times: equal for equal seeds."""
        plans = (EventKind.PLAN_CUT, EventKind.PLAN_STALL)
        return [(e.conn, e.kind, e.offset, e.detail) for e in self.events if e.kind in plans]

    def stats(self) -> dict[str, int]:
        return asdict(self.counters)

    def format_log(self) -> str:
        return "\n".join(str(e) for e in self.events)

    async def wait_for(
        self, kind: EventKind, *, conn: int | None = None, count: int = 1
    ) -> list[Event]:
        """Wait until the log holds `count` events of `kind` (for `conn` if given).

        Wrap it in ``asyncio.timeout(...)``: it waits as long as it takes.
        """

        def matches() -> list[Event]:
            return [e for e in self.events if e.kind is kind and conn in (None, e.conn)]

        while len(matches()) < count:
            await self._changed.wait()
        return matches()

    # -- internals ------------------------------------------------------------------

    def _log(self, cid: int, kind: EventKind, offset: int, detail: str = "") -> None:
        self.events.append(Event(cid, kind, offset, self.clock.monotonic(), detail))
        self._changed.set()
        self._changed = asyncio.Event()

    def _draw(self, cid: int, kind: EventKind, explicit: Sequence[int], span: object) -> int | None:
        """The point for connection `cid`: from the explicit list, else drawn, and logged."""
        if cid < len(explicit):
            point, how = explicit[cid], "explicit"
        elif isinstance(span, tuple):
            point, how = self._rng.randint(span[0], span[1]), f"drawn from {span[0]}:{span[1]}"
        else:
            return None
        self._log(cid, kind, point, how)
        return point

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid = self.counters.connections
        self.counters.connections += 1
        self._log(cid, EventKind.ACCEPT, 0)
        if self._closing:
            # Accepted just before close() and started after it: it would outlive close().
            _reset(writer)
            return
        if self.in_outage:
            self.counters.refused += 1
            self._log(cid, EventKind.REFUSED, 0)
            _reset(writer)
            return
        # Draw at accept, in a fixed order, so connection i gets the same plan every run.
        f = self.faults
        cut_at = self._draw(cid, EventKind.PLAN_CUT, f.cut_at, f.cut_after)
        stall_at = self._draw(cid, EventKind.PLAN_STALL, f.stall_at, f.stall_after)
        conn = _Conn(self, cid, reader, writer, cut_at, stall_at)
        self._conns[cid] = conn
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await conn.run()
        finally:
            del self._conns[cid]
            if task is not None:
                self._tasks.discard(task)

    async def _outage_loop(self) -> None:
        every, length = self.faults.outage_every, self.faults.outage_for
        assert every is not None
        while True:
            await self.clock.sleep(every - length)
            self.begin_outage()
            await self.clock.sleep(length)
            self.end_outage()


# -- standalone process --------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _span(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        return (int(low), int(high if sep else low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX bytes, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m resumer.lab.proxy", description="Fault-injecting TCP proxy on 127.0.0.1"
    )
    ap.add_argument("--target", type=_host_port, required=True, help="HOST:PORT to forward to")
    ap.add_argument("--listen-port", type=int, default=0, help="port to listen on (0: free)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cut-after", type=_span, metavar="MIN:MAX", help="RST after N bytes")
    ap.add_argument(
        "--cut-at", type=int, nargs="+", default=[], metavar="N", help="one cut per connection"
    )
    ap.add_argument("--stall-after", type=_span, metavar="MIN:MAX", help="stall after N bytes")
    ap.add_argument(
        "--stall-at", type=int, nargs="+", default=[], metavar="N", help="one stall per connection"
    )
    ap.add_argument("--stall-for", type=float, metavar="S", help="default: forever")
    ap.add_argument("--rate", type=float, metavar="BPS", help="server→client bytes/s")
    ap.add_argument("--latency", type=float, default=0.0, metavar="MS", help="one-way delay")
    ap.add_argument("--outage-every", type=float, metavar="S")
    ap.add_argument("--outage-for", type=float, default=1.0, metavar="S")
    ap.add_argument("--log", action="store_true", help="print the event log on exit (stderr)")
    return ap


async def _serve(args: argparse.Namespace, faults: Faults) -> dict[str, object]:
    host, port = args.target
    proxy = FaultProxy(host, port, faults, seed=args.seed, listen_port=args.listen_port)
    listening = await proxy.start()
    print(f"listening on 127.0.0.1:{listening}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()
    if args.log:
        print(proxy.format_log(), file=sys.stderr, flush=True)
    return {**proxy.stats(), "seed": args.seed}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        faults = Faults(
            cut_at=tuple(args.cut_at),
            cut_after=args.cut_after,
            stall_at=tuple(args.stall_at),
            stall_after=args.stall_after,
            stall_for=args.stall_for,
            rate=args.rate,
            latency=args.latency / 1000,
            outage_every=args.outage_every,
            outage_for=args.outage_for,
        )
    except ValueError as exc:
        print(f"proxy: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_serve(args, faults))
    except OSError as exc:
        print(f"proxy: cannot listen: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"proxy: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
