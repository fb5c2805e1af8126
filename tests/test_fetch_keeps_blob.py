"""``fetch -o`` publishes a copy: the blob stays in the content store (issue 9, item 1).

Against the real servers: the CNCF registry for the pull, nginx for the fetch. A fetch
and a pull that share one transfer both end with their blob; the same fetch again moves
no byte; ``-o -`` keeps the blob too; ``resumer prune`` removes what only fetch needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NginxFactory, PushImage
from test_powercut_properties import assert_nothing_unverified_visible, run_life
from test_pull_real import (
    assert_readable,
    cli_env,
    json_lines,
    resumer_cmd,
    run_cli,
)

from resumer.config import Config
from resumer.engine import Engine
from resumer.errors import StoreError
from resumer.events import Event, Status
from resumer.gc import prune_blobs
from resumer.lab.images import LayerSpec, build_image
from resumer.lab.powercut import PowerCutFS, unavailable_reason
from resumer.store import TransferState

MiB = 1 << 20


def stats_of(stdout: str | bytes) -> dict[str, int]:
    text = stdout.decode() if isinstance(stdout, bytes) else stdout
    [stats] = [m["stats"] for m in json_lines(text) if "stats" in m]
    return dict(stats)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_in(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / digest[7:]


def transfer_state(root: Path, key: str) -> str:
    db = sqlite3.connect(f"file:{root / 'state.db'}?mode=ro", uri=True)
    try:
        [(state,)] = db.execute("SELECT state FROM transfers WHERE key = ?", (key,)).fetchall()
    finally:
        db.close()
    return str(state)


def serve_blob(nginx_factory: NginxFactory, tmp_path: Path, data: bytes, extra: str = "") -> str:
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "blob").write_bytes(data)
    return f"{nginx_factory(www, extra_server=extra).url}/blob"


def fetch_cli(url: str, digest: str, out: str, root: Path, tmp_path: Path) -> Any:
    return run_cli(
        "fetch",
        url,
        "--digest",
        digest,
        "-o",
        out,
        "--root",
        str(root),
        "--progress",
        "json",
        env=cli_env(tmp_path),
    )


# ------------------------------------------------- a fetch and a pull share one transfer


@pytest.mark.parametrize("dest", ["root", "elsewhere"])
async def test_fetch_o_and_a_pull_sharing_its_transfer_both_end_with_the_blob(
    pushed_image: PushImage, nginx_factory: NginxFactory, tmp_path: Path, dest: str
) -> None:
    image = build_image(
        tmp_path / "build",
        (LayerSpec(size=6 * MiB, compressible=False), LayerSpec(compression="zstd")),
        seed=91,
    )
    pushed = pushed_image(repo="lab/shared", tag="v1", image=image)
    layer = image.layers[0]
    data = layer.read_bytes()
    # nginx at 4 MB/s: the fetch's transfer is still running when the pull asks for it.
    url = serve_blob(nginx_factory, tmp_path, data, "limit_rate 4m;")
    root, out = tmp_path / "root", tmp_path / "out.bin"
    layout = root if dest == "root" else tmp_path / "oci"

    async with Engine.open(root, Config(retry_delay=0)) as engine:
        flowing = asyncio.Event()

        def on_fetch(event: Event) -> None:
            if event.status == Status.DOWNLOADING and (event.current or 0) > 0:
                flowing.set()

        fetch = asyncio.create_task(
            engine.fetch(url, digest=layer.digest, dest=out, on_progress=on_fetch)
        )
        await asyncio.wait_for(flowing.wait(), 60)
        seen: list[Event] = []
        pull = await engine.pull(
            pushed.reference, dest=None if dest == "root" else layout, on_progress=seen.append
        )
        fetched = await fetch
        # One transfer served both: the pull watched the fetch's bytes arrive (it joined
        # while they flowed), and no second transfer or attempt was started.
        assert any(
            e.id == layer.digest[7:19] and e.status == Status.DOWNLOADING and e.current
            for e in seen
        )
        assert engine.transfers.started[layer.digest] == 1
        assert len(await engine.store.attempts(layer.digest)) == 1
        row = await engine.store.transfer(layer.digest)
        assert row is not None and row.state is TransferState.COMMITTED

    assert fetched.digest == layer.digest and out.read_bytes() == data
    assert pull.digest == image.digest
    # The store still has the blob its transfer row says is committed …
    assert blob_in(root, layer.digest).read_bytes() == data
    assert transfer_state(root, layer.digest) == "committed"
    # … and the pull's layout has its whole image, as skopeo reads it.
    inspected = assert_readable(layout, "v1", pushed.reference, tmp_path)
    assert inspected["Layers"] == [x.digest for x in image.layers]
    assert blob_in(layout, layer.digest).read_bytes() == data
    assert out.stat().st_ino != blob_in(root, layer.digest).stat().st_ino  # a copy


# ------------------------------------------------------- the blob stays: nothing moves again


def test_fetch_o_again_moves_no_byte_and_the_store_keeps_the_blob(
    nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    data = os.urandom(5 * MiB + 17)
    digest = sha256(data)
    url = serve_blob(nginx_factory, tmp_path, data)
    root, first, second = tmp_path / "root", tmp_path / "a.bin", tmp_path / "b.bin"

    done = fetch_cli(url, digest, str(first), root, tmp_path)
    assert done.returncode == 0, done.stderr
    assert stats_of(done.stdout)["wire_bytes"] == len(data)
    assert first.read_bytes() == data
    assert blob_in(root, digest).read_bytes() == data
    assert transfer_state(root, digest) == "committed"

    for out in (second, first):  # a new output, then the same one replaced
        again = fetch_cli(url, digest, str(out), root, tmp_path)
        assert again.returncode == 0, again.stderr
        assert stats_of(again.stdout)["wire_bytes"] == 0
        assert out.read_bytes() == data
    assert blob_in(root, digest).read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp output


def test_fetch_o_dash_streams_the_blob_and_keeps_it(
    nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB)
    digest = sha256(data)
    url = serve_blob(nginx_factory, tmp_path, data)
    root = tmp_path / "root"
    cmd = ["fetch", url, "--digest", digest, "-o", "-", "--root", str(root), "--progress", "json"]

    def run() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            resumer_cmd(*cmd),
            capture_output=True,
            env=cli_env(tmp_path),
            timeout=120,
            check=False,
        )

    streamed = run()
    assert streamed.returncode == 0, streamed.stderr.decode()
    assert streamed.stdout == data
    assert blob_in(root, digest).read_bytes() == data
    assert transfer_state(root, digest) == "committed"
    again = run()
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout == data
    assert stats_of(again.stderr)["wire_bytes"] == 0


@pytest.fixture
def cut_fs(tmp_path: Path) -> Iterator[PowerCutFS]:
    """A power-cut file system (``resumer.lab.powercut``), mounted."""
    if unavailable_reason() is not None:
        pytest.skip(str(unavailable_reason()))
    for d in ("backing", "mnt"):
        (tmp_path / d).mkdir()
    fs = PowerCutFS(tmp_path / "backing", tmp_path / "mnt")
    fs.mount()
    try:
        yield fs
    finally:
        fs.close()


def test_a_power_cut_right_after_fetch_o_keeps_the_blob_and_the_next_fetch_moves_no_byte(
    cut_fs: PowerCutFS, nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    """The issue's case: the blob is durable in the store when fetch returns, so after a
    cut (everything unsynced dropped, on the power-cut file system) nothing moves again."""
    data = os.urandom(6 * MiB)
    digest = sha256(data)
    url = serve_blob(nginx_factory, tmp_path, data)
    fs = cut_fs
    root, out = fs.mountpoint / "root", fs.mountpoint / "out.bin"
    argv = ["fetch", url, "--digest", digest, "-o", str(out), "--root", str(root)]
    done = run_life(argv, fs, None)
    assert done.returncode == 0, done.stderr
    assert done.stats["wire_bytes"] == len(data)
    fs.cut()
    fs.mount()
    assert out.read_bytes() == data
    assert blob_in(root, digest).read_bytes() == data
    assert_nothing_unverified_visible(root, out, digest)
    again = run_life(argv, fs, None)
    assert again.returncode == 0, again.stderr
    assert again.stats["wire_bytes"] == 0
    assert out.read_bytes() == data


# ------------------------------------------------------------ prune: what fetch alone needed


def test_prune_removes_blobs_only_fetch_brought_in_and_keeps_every_image(
    pushed_image: PushImage, nginx_factory: NginxFactory, tmp_path: Path
) -> None:
    here = pushed_image(repo="lab/here", tag="v1", seed=1)  # pulled into the root
    there = pushed_image(repo="lab/there", tag="v1", seed=2)  # pulled into --dest only
    data = os.urandom(MiB)
    digest = sha256(data)
    url = serve_blob(nginx_factory, tmp_path, data)
    root, out, elsewhere = tmp_path / "root", tmp_path / "out.bin", tmp_path / "oci"
    env = cli_env(tmp_path)

    for ref, where in ((here.reference, ()), (there.reference, ("--dest", str(elsewhere)))):
        pulled = run_cli("pull", ref, "--root", str(root), *where, env=env)
        assert pulled.returncode == 0, pulled.stderr
    fetched = fetch_cli(url, digest, str(out), root, tmp_path)
    assert fetched.returncode == 0, fetched.stderr
    stored = {p.name for p in (root / "blobs" / "sha256").iterdir()}
    needed = stored - {digest[7:]}
    # The root's image whole; of the --dest pull, its layers (the store of its transfers).
    assert len(needed) == len(here.image.layers) + 2 + len(there.image.layers)

    pruned = run_cli("prune", "--root", str(root), env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.count("Deleted ") == 1 and f"Deleted {digest}" in pruned.stdout
    assert {p.name for p in (root / "blobs" / "sha256").iterdir()} == needed
    assert out.read_bytes() == data  # the published copy is the user's
    assert_readable(root, "v1", here.reference, tmp_path)
    assert_readable(elsewhere, "v1", there.reference, tmp_path)

    # Once its pull is removed, the --dest pull's layers are let go from the root's
    # store; its layout keeps its own (hardlinked) blobs, and the root's image its own.
    removed = run_cli("rm", there.reference, "--root", str(root), env=env)
    assert removed.returncode == 0, removed.stderr
    pruned = run_cli("prune", "--root", str(root), env=env)
    assert pruned.returncode == 0, pruned.stderr
    for layer in there.image.layers:
        assert f"Deleted {layer.digest}" in pruned.stdout
    assert_readable(root, "v1", here.reference, tmp_path)
    assert_readable(elsewhere, "v1", there.reference, tmp_path)

    # Pruned is gone for good: the next fetch downloads it again.
    again = fetch_cli(url, digest, str(out), root, tmp_path)
    assert again.returncode == 0, again.stderr
    assert stats_of(again.stdout)["wire_bytes"] == len(data)
    assert json.loads((root / "index.json").read_text())["manifests"]


async def test_prune_blobs_follows_indexes_keeps_new_blobs_and_trusts_no_corrupt_index(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    async with Engine.open(root, Config()) as engine:
        layout = engine.ingest.layout
        put = layout.content.commit_bytes
        config, layer, loose = await put(b"{}"), await put(b"layer"), await put(b"loose")

        def desc(digest: str, size: int, media_type: str = "x/y") -> dict[str, Any]:
            return {"mediaType": media_type, "digest": digest, "size": size}

        manifest_bytes = json.dumps(
            {"schemaVersion": 2, "config": desc(config, 2), "layers": [desc(layer, 5)]}
        ).encode()
        manifest = await put(manifest_bytes)
        index_bytes = json.dumps({"manifests": [desc(manifest, len(manifest_bytes))]}).encode()
        index = await put(index_bytes)
        await layout.add_image(
            desc(index, len(index_bytes), "application/vnd.oci.image.index.v1+json"),
            ref_name="v1",
            image_name="reg.example/app:v1",
        )
        # Nothing is older than a run that started before every blob: nothing goes.
        assert await prune_blobs(engine.ingest, before=0.0) == []
        later = time.time() + 1
        assert await prune_blobs(engine.ingest, before=later) == [(loose, 5)]
        assert {layout.content.has(d) for d in (index, manifest, config, layer)} == {True}

        late = await put(b"late")
        (root / "index.json").write_text("{torn")
        with pytest.raises(StoreError, match=r"index\.json"):
            await prune_blobs(engine.ingest, before=time.time() + 1)
        assert layout.content.has(late)  # a corrupt index removes nothing
