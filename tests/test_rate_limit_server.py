"""``max-download-rate`` measured where it matters: the bytes a real server delivered.

Three transfers share one token bucket (the engine's), each over one connection (K = 1)
or four (K = 4: twelve connections). The server counts, per connection, the bytes the
client's TCP acknowledged (TCP_INFO ``tcpi_bytes_acked``): bytes that crossed the wire,
not bytes written into the server's own buffers, whose few MiBs would otherwise be
counted as sent before they were. A sampler notes the count every 0.25 s. Once the
buffers between the two ends are full (a warm-up), the server can only deliver what the
client reads, so the bytes delivered over the next 20 s are the rate cap's doing. 20 s
of real time is the point of this test: it measures real throughput.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from pathlib import Path

import pytest
from aiohttp import web
from badserver import BlobServer
from test_helpers_core import make_blob, open_engine

from resumer import fetch as fetch_module
from resumer.config import MiB

RATE = 2 * MiB
WARMUP = 5.0
#: The server's send buffer, fixed: autotuned, Linux lets it grow to 4 MiB per connection
#: (tcp_wmem), and its swings of a few MiB would be the measurement's error, not the cap's.
SNDBUF = 128 * 1024


#: where ``tcpi_bytes_acked`` (a u64) sits in Linux's struct tcp_info: 8 bytes of u8
#: fields, 24 u32 fields, then tcpi_pacing_rate and tcpi_max_pacing_rate (u64 each)
_BYTES_ACKED = struct.Struct("=Q"), 8 + 24 * 4 + 2 * 8


def bytes_acked(sock: socket.socket) -> int | None:
    """The bytes this connection's peer acknowledged (None: the socket is closed)."""
    field, offset = _BYTES_ACKED
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, offset + field.size)
    except OSError:
        return None
    return int(field.unpack_from(info, offset)[0])


class CountingServer(BlobServer):
    """A BlobServer whose connections keep a small, fixed send buffer, and that counts
    the bytes its connections delivered (``delivered``, updated by ``sample``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        #: per connection (its socket, held here so that no other takes its place): the
        #: bytes acknowledged when last sampled
        self._acked: dict[socket.socket, int] = {}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        self._acked.setdefault(sock, 0)
        return await super()._handle(request)

    def sample(self) -> int:
        """Bytes acknowledged by every connection so far (a closed one: as last sampled)."""
        for sock in list(self._acked):
            now = bytes_acked(sock)
            if now is not None:
                self._acked[sock] = now
        return sum(self._acked.values())


async def _measure(
    tmp_path: Path, *, rate: int, window: float, blob_size: int, connections: int = 1
) -> tuple[float, list[int]]:
    """(bytes/s the server delivered over ``window`` after the warm-up, bytes per blob)."""
    blobs = {f"b{i}": make_blob(blob_size, seed=40 + i) for i in range(3)}
    digests = {k: "sha256:" + hashlib.sha256(v).hexdigest() for k, v in blobs.items()}
    async with (
        CountingServer(blobs) as srv,
        open_engine(
            tmp_path / "root",
            max_download_rate=rate,
            stall_timeout=30.0,
            max_connections_per_blob=connections,
            min_segment_size=4 * MiB,
        ) as eng,
    ):
        loop = asyncio.get_running_loop()
        fetches = [
            asyncio.create_task(eng.fetch(f"{srv.url}/{k}", digest=digests[k])) for k in blobs
        ]
        samples: list[tuple[float, int]] = []
        start = loop.time()
        while loop.time() - start < WARMUP + window:
            samples.append((loop.time(), srv.sample()))
            await asyncio.sleep(0.25)
        samples.append((loop.time(), srv.sample()))
        # Every transfer is still running: the window saw three of them share the cap.
        assert not any(f.done() for f in fetches), [f for f in fetches if f.done()]
        t0, b0 = next((t, b) for t, b in samples if t - start >= WARMUP)
        t1, b1 = samples[-1]
        measured = (b1 - b0) / (t1 - t0)
        for f in fetches:
            f.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        rows = [await eng.store.transfer(digests[k]) for k in blobs]  # kept on cancel
        kept = [row.offset if row is not None else 0 for row in rows]
    return measured, kept


@pytest.mark.parametrize("connections", [1, 4])
async def test_three_transfers_share_the_rate_cap_within_5_percent_over_20_s(
    tmp_path: Path, connections: int
) -> None:
    measured, kept = await _measure(
        tmp_path, rate=RATE, window=20.0, blob_size=24 * MiB, connections=connections
    )
    print(
        f"K={connections}: {measured / MiB:.4f} MiB/s delivered by the server "
        f"(cap {RATE / MiB} MiB/s)"
    )
    assert abs(measured - RATE) <= 0.05 * RATE, measured / RATE
    # Each transfer got a share: nobody starved.
    assert all(k > 0 for k in kept), kept


async def test_the_stream_reader_path_holds_the_cap_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies aiohttp reads for us (chunked, Range ignored) are paced in ``consume``."""
    monkeypatch.setattr(fetch_module, "_DIRECT_BODY", False)
    measured, kept = await _measure(tmp_path, rate=4 * MiB, window=6.0, blob_size=16 * MiB)
    print(f"stream reader: {measured / MiB:.4f} MiB/s at the server (cap 4 MiB/s)")
    assert abs(measured - 4 * MiB) <= 0.05 * 4 * MiB, measured / (4 * MiB)
    assert all(k > 0 for k in kept), kept
