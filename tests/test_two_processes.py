"""Two resumer processes on one root: the second waits for the first, then completes.

The first ``resumer pull`` runs through a rate-limited proxy; once it reports bytes the test
stops it (SIGSTOP: it keeps its lock), starts the second, reads the second's "waiting for
pid N" line on stderr, checks the library lock refuses too, continues the first (SIGCONT)
and lets both finish. Both images must verify and the state database must be intact. Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
from conftest import PushImage
from test_resume_process import (
    MiB,
    assert_image_complete,
    cli_env,
    integrity_ok,
    layer_id,
    proxied,
    reference_via,
    resumer_cmd,
)

from resumer.engine import Engine
from resumer.errors import RootLockedError
from resumer.lab.images import LayerSpec, build_image
from resumer.rootlock import RootLock


def _specs(n: int, seed_size: int) -> tuple[LayerSpec, ...]:
    return tuple(
        LayerSpec(size=seed_size, compression="gzip", compressible=False) for _ in range(n)
    )


async def _read_json(stream: asyncio.StreamReader, into: list[dict[str, object]]) -> None:
    async for raw in stream:
        text = raw.decode().strip()
        if text:
            into.append(json.loads(text))


async def test_second_process_waits_for_the_first_then_both_complete(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    work = tmp_path / "build"
    base = build_image(work, _specs(3, 3 * MiB), seed=31)
    child = build_image(work, _specs(1, 2 * MiB), seed=32, base=base)
    # Distinct tags: the root's layout names each image by its tag.
    a = pushed_image(repo="lab/base", tag="base", image=base)
    b = pushed_image(repo="lab/child", tag="child", image=child)
    root, env = tmp_path / "root", cli_env(tmp_path)

    async with proxied(a, rate=8 * MiB) as proxy:
        ref_a, ref_b = reference_via(proxy, a), reference_via(proxy, b)

        def start(ref: str) -> asyncio.Future[asyncio.subprocess.Process]:
            return asyncio.ensure_future(
                asyncio.create_subprocess_exec(
                    *resumer_cmd("pull", ref, "--root", str(root), "--progress", "json"),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                )
            )

        first = await start(ref_a)
        second: asyncio.subprocess.Process | None = None
        assert first.stdout is not None and first.stderr is not None
        lines_a: list[dict[str, object]] = []
        lines_b: list[dict[str, object]] = []
        try:
            async with asyncio.timeout(60):
                # The first holds the root once it reports bytes.
                async for raw in first.stdout:
                    msg = json.loads(raw)
                    lines_a.append(msg)
                    if msg.get("status") == "Downloading":
                        break
                # Held still (with its lock) until the second has said it waits: the
                # first cannot finish first however slow the second is to start.
                first.send_signal(signal.SIGSTOP)
                reading_a = asyncio.create_task(_read_json(first.stdout, lines_a))
                second = await start(ref_b)
                assert second.stdout is not None and second.stderr is not None
                reading_b = asyncio.create_task(_read_json(second.stdout, lines_b))
                waiting = (await second.stderr.readline()).decode()
                # It says whom it waits for, while that one still runs.
                assert f"waiting for pid {first.pid}" in waiting, waiting
                assert str(root) in waiting
                assert first.returncode is None

                # The library's own lock with no wait fails at once, naming the holder.
                with pytest.raises(RootLockedError) as info:
                    async with Engine.open(root, lock_timeout=0):
                        pass
                assert str(root) in str(info.value)
                assert f"in use by pid {first.pid}" in str(info.value)
                # Still running, and the second has not pulled anything meanwhile.
                assert first.returncode is None
                assert lines_b == []
                first.send_signal(signal.SIGCONT)

                assert await first.wait() == 0, (await first.stderr.read()).decode()
                await reading_a
                assert await second.wait() == 0, (await second.stderr.read()).decode()
                await reading_b
        finally:
            for p in (first, second):
                if p is not None and p.returncode is None:
                    p.kill()
                    await p.wait()

    assert lines_a[-1].keys() == {"stats"} and lines_b[-1].keys() == {"stats"}
    # The second found the first's layers registered: only its own layer moved.
    shared = {layer_id(x.digest) for x in base.layers}
    own = layer_id(child.layers[-1].digest)
    exists = {m.get("id") for m in lines_b if m.get("status") == "Already exists"}
    assert exists == shared
    assert any(m.get("id") == own and m.get("status") == "Pull complete" for m in lines_b)
    stats_b = lines_b[-1]["stats"]
    assert isinstance(stats_b, dict) and stats_b["payload_bytes"] == child.layers[-1].size

    assert_image_complete(root, base, ref_a, "base")
    assert_image_complete(root, child, ref_b, "child")
    assert integrity_ok(root)


async def test_lock_with_timeout_zero_raises_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    holder = RootLock(root)
    await holder.acquire()
    try:
        with pytest.raises(RootLockedError) as info:
            async with Engine.open(root, lock_timeout=0):
                pass
        assert str(info.value) == f"{root}: in use by pid {os.getpid()}"
    finally:
        holder.release()
    async with Engine.open(root, lock_timeout=0) as engine:  # free again: no error
        assert engine.lock is not None
