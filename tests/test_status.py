"""``resumer status`` after a killed pull, after a failed run, and while the root is held.

1. ``resumer pull`` through a rate-limited proxy is SIGKILLed mid-transfer: status lists the
   pending pull with its layers and each partial with the offset the next run will keep,
   its size, one attempt in the last run, nothing wasted and "interrupted".
2. One partial's first chunk is corrupted on disk, and ``resumer resume`` runs with one
   attempt per layer through a proxy that cuts every connection: it fails (exit 1). Status
   now shows the failed pull with its error, one attempt each in the last run, the bytes
   the reopen threw away (exactly: the corrupted chunk, and each unrecorded tail) and each
   transfer's last error.
3. With the root lock held by another process, status still answers and names the holder.
4. A clean ``resume`` completes; status has nothing unfinished.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

from conftest import PushImage
from test_resume_process import (
    MiB,
    Progress,
    assert_image_complete,
    cli_env,
    kept_after_kill,
    layer_id,
    partial_on_disk,
    reference_via,
    resumer_cmd,
    run_cli,
)

from resumer.lab.images import LayerSpec, build_image
from resumer.lab.proxy import FaultProxy, Faults
from resumer.progress import format_bytes
from resumer.rootlock import RootLock
from resumer.status import INTERRUPTED

CHUNK = 256 * 1024


async def _run(args: list[str], env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *resumer_cmd(*args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def _status(root: Path, env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """``resumer status --json`` parsed, and the text ``resumer status``."""
    report = json.loads(await _run(["status", "--root", str(root), "--json"], env))
    return report, await _run(["status", "--root", str(root)], env)


async def test_status_after_kill_after_failure_and_while_the_root_is_held(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    specs = [LayerSpec(size=2 * MiB, compression="gzip", compressible=False)] * 3
    image = build_image(tmp_path / "build", specs, seed=41)
    pushed = pushed_image(repo="lab/status", tag="v1", image=image)
    layers = image.layers
    sizes = {layer_id(x.digest): x.size for x in layers}
    total = sum(sizes.values())
    root, env = tmp_path / "root", cli_env(tmp_path)
    common = ["--root", str(root), "--chunk-size", str(CHUNK), "--progress", "json"]

    # --- 1. killed mid-transfer -----------------------------------------------------
    proxy = FaultProxy("127.0.0.1", pushed.registry.port, Faults(rate=4 * MiB))
    port = await proxy.start()
    ref = reference_via(proxy, pushed)
    progress = Progress(sizes)

    def half(msg: dict[str, Any]) -> bool:
        progress.feed(msg)
        return progress.total >= total // 2 and len(progress.running) == len(layers)

    try:
        killed = await run_cli(["pull", ref, *common], env, kill_when=half)
    finally:
        await proxy.close()
    assert killed.returncode == -signal.SIGKILL

    kept = {x.digest: kept_after_kill(root, x.digest, x.size) for x in layers}
    on_disk = {x.digest: partial_on_disk(root, x.digest) for x in layers}
    assert all(0 < kept[x.digest] < x.size for x in layers), kept

    report, text = await _status(root, env)
    assert report["root"] == str(root) and report["in_use_by"] is None
    [pull] = report["pulls"]
    assert pull["reference"] == ref and pull["state"] == "pending"
    assert [(la["position"], la["digest"], la["size"]) for la in pull["layers"]] == [
        (i, x.digest, x.size) for i, x in enumerate(layers)
    ]
    assert [la["recorded"] for la in pull["layers"]] == [kept[x.digest] for x in layers]
    by_key = {t["key"]: t for t in report["transfers"]}
    assert set(by_key) == {x.digest for x in layers}
    for x in layers:
        t = by_key[x.digest]
        assert t["size"] == x.size and t["state"] == "partial"
        assert t["recorded"] == kept[x.digest]  # what the next run will keep
        assert 0 <= t["offset"] <= t["recorded"]  # durable never claims more
        assert t["attempts_last_run"] == 1
        assert t["wasted_bytes"] == 0
        assert t["last_error"] == INTERRUPTED
    assert f"pull {pull['id']} {ref}: pending" in text
    for x in layers:
        assert f"{x.digest[7:19]} pending  {format_bytes(kept[x.digest])}/" in text
        assert f"{x.digest[:19]}  {format_bytes(kept[x.digest])}/{format_bytes(x.size)}" in text
    assert text.count("last error: interrupted") == len(layers)

    # --- 2. a corrupted partial, then a run that fails ------------------------------
    victim = layers[1].digest
    path = root / "ingest" / victim.replace(":", "-")
    with path.open("r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    # Same port: the stored pull names it. Every connection is cut after a few bytes.
    cutting = FaultProxy(
        "127.0.0.1",
        pushed.registry.port,
        Faults(cut_after=(96 * 1024, 128 * 1024)),
        listen_port=port,
    )
    await cutting.start()
    try:
        failed = await run_cli(
            ["resume", *common, "--max-download-attempts", "1", "--retry-delay", "0"], env
        )
    finally:
        await cutting.close()
    assert failed.returncode == 1, failed.stderr
    errors = [m for m in failed.lines if "error" in m]
    assert errors and errors[-1]["errorDetail"]["message"] == errors[-1]["error"]

    report, text = await _status(root, env)
    [pull] = report["pulls"]
    assert pull["state"] == "failed" and pull["last_error"]
    assert pull["last_error"] in text
    by_key = {t["key"]: t for t in report["transfers"]}
    for x in layers:
        t = by_key[x.digest]
        assert t["attempts_last_run"] == 1, t
        # The unrecorded tail of each, and of the victim also its corrupted first chunk:
        # only that chunk (a partial is a map of chunks, not a prefix).
        expected_waste = on_disk[x.digest] - kept[x.digest]
        if x.digest == victim:
            expected_waste += min(CHUNK, kept[x.digest])
        assert t["wasted_bytes"] == expected_waste, (x.digest, t, on_disk, kept)
        assert t["last_error"] and t["last_error"] != INTERRUPTED
        assert f"last error: {t['last_error']}" in text
        assert f"wasted {format_bytes(expected_waste)}" in text
    assert by_key[victim]["recorded"] < kept[victim] or kept[victim] == 0
    assert any(t["state"] == "failed" for t in by_key.values())

    # --- 3. status while another process holds the root -----------------------------
    holder = RootLock(root)
    await holder.acquire()
    try:
        report, text = await _status(root, env)
    finally:
        holder.release()
    assert report["in_use_by"] == os.getpid()
    assert f"in use by pid {os.getpid()}" in text
    assert len(report["pulls"]) == 1

    # --- 4. a clean run completes it -------------------------------------------------
    clean = FaultProxy("127.0.0.1", pushed.registry.port, listen_port=port)
    await clean.start()
    try:
        done = await run_cli(["resume", *common], env)
    finally:
        await clean.close()
    assert done.returncode == 0, done.stderr
    assert_image_complete(root, image, ref, "v1")
    report, text = await _status(root, env)
    assert report["pulls"] == [] and report["transfers"] == []
    assert "nothing unfinished" in text
