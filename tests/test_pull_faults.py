"""Pulls over a bad link: a seeded cutting proxy, and a CLI process SIGKILLed mid-pull.

The FaultProxy (``resumer.lab.proxy``) sits between resumer and the real registry, so its
``counters.bytes_down`` is every byte the registry sent through it: layer bodies, the
manifest and config, and every HTTP header. Those totals are compared with the image
size, which here means layers + config + manifest (the bytes a perfect pull must move).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
from pathlib import Path

from conftest import PushImage
from servers import Registry
from test_pull_real import (
    MiB,
    assert_readable,
    cli_env,
    index_entries,
    resumer_cmd,
)

from resumer.config import Config
from resumer.engine import Engine
from resumer.lab.images import BuiltImage, LayerSpec, build_image
from resumer.lab.proxy import FaultProxy, Faults

#: The design's checkpoint interval: what a kill may cost at most, per kill.
CHECKPOINT_INTERVAL = 4 * MiB


def build_lossy_image(work: Path, seed: int) -> BuiltImage:
    """~24 MiB on the wire: two incompressible layers (gzip, zstd) and a compressible one."""
    return build_image(
        work,
        (
            LayerSpec(size=10 * MiB, compressible=False),
            LayerSpec(size=8 * MiB, compression="zstd", compressible=False),
            LayerSpec(size=24 * MiB, files=8),
        ),
        seed=seed,
    )


def full_size(image: BuiltImage) -> int:
    return image.total_layer_bytes() + len(image.config) + len(image.manifest)


async def test_pull_through_a_cutting_proxy_completes_within_one_percent_of_the_image(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    image = build_lossy_image(tmp_path / "b", seed=71)
    await asyncio.to_thread(pushed_image, repo="lab/lossy", tag="v1", image=image)
    size = full_size(image)
    faults = Faults(cut_after=(200_000, 2_000_000))
    async with FaultProxy("127.0.0.1", registry.port, faults, seed=71) as proxy:
        ref = f"127.0.0.1:{proxy.port}/lab/lossy:v1"
        # Cuts every 0.2–2 MB mean ~5–50 attempts per layer: the budget must allow that.
        config = Config(retry_delay=0, max_download_attempts=100)
        async with Engine.open(tmp_path / "root", config) as engine:
            outcome = await engine.pull(ref, dest=tmp_path / "oci")
    wire = proxy.counters.bytes_down
    ratio = wire / size
    print(
        f"cutting proxy: {proxy.counters.cuts} cuts, {proxy.counters.connections} connections, "
        f"wire {wire} B (headers, manifest and config included) for {size} B: {ratio:.4f}x; "
        f"engine: {outcome.stats}"
    )
    assert proxy.counters.cuts >= 10  # the link really was bad
    assert outcome.stats.resumes >= 10
    assert ratio <= 1.01, proxy.format_log()[-3000:]
    assert outcome.stats.payload_bytes == image.total_layer_bytes()
    assert outcome.stats.wasted_bytes == 0
    assert_readable(tmp_path / "oci", "v1", ref, tmp_path)


async def _run_until(
    args: list[str], env: dict[str, str], kill_at: int | None
) -> tuple[int, list[dict[str, object]]]:
    """Run the CLI; SIGKILL it once its layers' progress sums to ``kill_at`` bytes.

    The progress lines arrive as the bytes do, so the kill needs no sleep.
    """
    proc = await asyncio.create_subprocess_exec(
        *resumer_cmd(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    current: dict[str, int] = {}
    messages: list[dict[str, object]] = []
    killed = False
    async for line in proc.stdout:
        msg = json.loads(line)
        messages.append(msg)
        detail = msg.get("progressDetail")
        if isinstance(detail, dict) and isinstance(msg.get("id"), str):
            current[str(msg["id"])] = int(detail["current"])
        if kill_at is not None and not killed and sum(current.values()) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            killed = True
    stderr = await proc.stderr.read()
    code = await proc.wait()
    if kill_at is not None:
        assert killed, f"the run ended before {kill_at} bytes: {stderr.decode()[-2000:]}"
        assert code == -signal.SIGKILL
    else:
        assert code == 0, stderr.decode()[-3000:]
    return code, messages


async def test_cli_pull_sigkilled_three_times_then_resumed_loses_at_most_a_checkpoint_per_kill(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    image = build_lossy_image(tmp_path / "b", seed=81)
    await asyncio.to_thread(pushed_image, repo="lab/killed", tag="v1", image=image)
    size = full_size(image)
    layers = image.total_layer_bytes()
    rng = random.Random(81)
    kill_points = sorted(rng.randrange(layers // 10, layers * 9 // 10) for _ in range(3))
    root, dest = tmp_path / "root", tmp_path / "oci"
    env = cli_env(tmp_path)
    # 15 MB/s: a whole pull takes ~1.6 s, so every kill lands mid-transfer.
    async with FaultProxy("127.0.0.1", registry.port, Faults(rate=15e6), seed=81) as proxy:
        ref = f"127.0.0.1:{proxy.port}/lab/killed:v1"
        pull = ["pull", ref, "--root", str(root), "--dest", str(dest), "--progress", "json"]
        resume = ["resume", "--root", str(root), "--progress", "json"]
        # pull, pull again, resume: each SIGKILLed at the next seeded point; then resume.
        for args, point in zip((pull, pull, resume), kill_points, strict=True):
            await _run_until(args, env, point)
            # Killed before the end: the image is not named in the layout yet.
            assert not dest.exists() or index_entries(dest) == []
        _, final = await _run_until(resume, env, None)
    wire = proxy.counters.bytes_down
    loss = wire - size
    print(
        f"3 SIGKILLs at {kill_points} of {layers} layer bytes: wire {wire} B for {size} B "
        f"({wire / size:.4f}x), loss {loss} B = {loss / 3 / MiB:.2f} MiB per kill"
    )
    assert wire <= size + 3 * CHECKPOINT_INTERVAL
    assert final[-1]["stats"]["resumes"] >= 1  # type: ignore[index]
    assert any(str(m.get("status", "")).startswith("Resuming from") for m in final)
    assert {"status": f"Status: Downloaded newer image for {ref}"} in final
    assert_readable(dest, "v1", ref, tmp_path)
