"""``resumer pull`` against the real CNCF registry: the layout it writes, and how it ends.

Images are built by the tests (random tar layers, gzip and zstd, a repeated layer, a
multi-platform index) and pushed with skopeo. After every pull the destination is read
back by skopeo (``inspect`` and ``copy`` to ``dir:``) and every blob is re-hashed.

The helpers at the top are shared by the other ``test_pull_*`` modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conftest import PushImage
from servers import Registry, skopeo_copy, skopeo_inspect

from resumer.config import Config
from resumer.engine import Engine
from resumer.events import Event
from resumer.lab.images import BuiltImage, LayerSpec, build_image, push_to_registry
from resumer.layout import IMAGE_NAME, REF_NAME

KiB = 1 << 10
MiB = 1 << 20
LAYER_STATUSES = {
    "Pulling fs layer",
    "Waiting",
    "Downloading",
    "Verifying Checksum",
    "Download complete",
    "Extracting",
    "Pull complete",
    "Already exists",
}

# ---------------------------------------------------------------------- shared helpers


def resumer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "resumer", *args]


def cli_env(tmp_path: Path, docker_config: Path | None = None) -> dict[str, str]:
    """The environment of a CLI child: no credentials of the machine leak in."""
    env = dict(os.environ)
    if docker_config is None:
        docker_config = tmp_path / "no-docker-config"
        docker_config.mkdir(exist_ok=True)
    env["DOCKER_CONFIG"] = str(docker_config)
    env.pop("RESUMER_ROOT", None)
    return env


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        resumer_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        check=False,
    )


def pull_cli(
    reference: str,
    root: Path,
    tmp_path: Path,
    *options: str,
    dest: Path | None = None,
    progress: str = "plain",
) -> subprocess.CompletedProcess[str]:
    """``resumer pull REFERENCE OPTIONS --root ROOT [--dest DEST] --progress PROGRESS``."""
    where = ("--root", str(root)) + (("--dest", str(dest)) if dest is not None else ())
    return run_cli(
        "pull", reference, *options, *where, "--progress", progress, env=cli_env(tmp_path)
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def index_entries(dest: Path) -> list[dict[str, Any]]:
    doc = json.loads((dest / "index.json").read_text())
    manifests: list[dict[str, Any]] = doc["manifests"]
    return manifests


def entry_for(dest: Path, tag: str) -> dict[str, Any]:
    [entry] = [m for m in index_entries(dest) if m["annotations"][REF_NAME] == tag]
    return entry


def assert_readable(dest: Path, tag: str, reference: str, scratch: Path) -> dict[str, Any]:
    """skopeo reads the image, copies it out, and every blob in ``dest`` hashes to its name.

    Returns the ``skopeo inspect`` document.
    """
    entry = entry_for(dest, tag)
    assert entry["annotations"][IMAGE_NAME] == reference
    assert json.loads((dest / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    inspected: dict[str, Any] = skopeo_inspect(f"oci:{dest}:{tag}")
    out = scratch / f"copy-{len(list(scratch.glob('copy-*')))}"
    skopeo_copy(f"oci:{dest}:{tag}", f"dir:{out}")
    assert (out / "manifest.json").exists()
    assert_blobs_verify(dest)
    return inspected


def assert_blobs_verify(dest: Path) -> None:
    blobs = sorted((dest / "blobs" / "sha256").iterdir())
    assert blobs
    for blob in blobs:
        assert not blob.name.startswith("."), f"temporary file left in the layout: {blob}"
        assert sha256_file(blob) == blob.name, f"{blob} does not hash to its name"


def layer_digests(dest: Path, manifest_digest: str) -> list[str]:
    manifest = json.loads((dest / "blobs" / "sha256" / manifest_digest[7:]).read_bytes())
    return [x["digest"] for x in manifest["layers"]]


def image_bytes(image: BuiltImage) -> int:
    """Unique layer bytes of a (single-platform) image: what a pull must move."""
    return image.total_layer_bytes()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def attempts_per_digest(root: Path) -> dict[str, int]:
    async with Engine.open(root, Config()) as engine:
        rows = await engine.store.attempts()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.key] = counts.get(row.key, 0) + 1
    return counts


def build_repeated(work: Path, seed: int, size: int = 256 * KiB) -> BuiltImage:
    """gzip, zstd, then the gzip layer again: a stack with a repeated digest."""
    base = build_image(
        work,
        (LayerSpec(size=size), LayerSpec(size=size, compression="zstd", compressible=False)),
        seed=seed,
    )
    return build_image(work, (base.layers[0], base.layers[1], base.layers[0]), seed=seed)


# ---------------------------------------------------------------------- readable output


def test_pulled_image_with_gzip_zstd_and_a_repeated_layer_is_readable_by_skopeo(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    image = build_repeated(tmp_path / "build", seed=11)
    assert image.layers[0].digest == image.layers[2].digest
    pushed = pushed_image(repo="lab/repeat", tag="v1", image=image)
    dest, root = tmp_path / "elsewhere" / "oci", tmp_path / "root"

    done = pull_cli(pushed.reference, root, tmp_path, dest=dest)
    assert done.returncode == 0, done.stderr

    inspected = assert_readable(dest, "v1", pushed.reference, tmp_path)
    assert inspected["Digest"] == image.manifest_digest
    assert inspected["Layers"] == [x.digest for x in image.layers]
    assert layer_digests(dest, entry_for(dest, "v1")["digest"]) == [x.digest for x in image.layers]
    # --dest elsewhere: the root keeps its own (empty) layout and the state, not the image.
    assert (root / "state.db").exists()
    assert index_entries(root) == []


async def test_two_images_share_the_default_root_layout_and_the_base_layer_moves_once(
    registry: Registry, pushed_image: PushImage, tmp_path: Path
) -> None:
    base = build_image(tmp_path / "b", (LayerSpec(size=512 * KiB),), seed=21)
    first = build_image(tmp_path / "b", (LayerSpec(compression="zstd"),), seed=22, base=base)
    second = build_image(tmp_path / "b", (LayerSpec(),), seed=23, base=base)
    shared = base.layers[0].digest
    pushed_image(repo="lab/one", tag="v1", image=first)
    pushed_image(repo="lab/two", tag="v2", image=second)
    root = tmp_path / "root"
    refs = (f"{registry.host}/lab/one:v1", f"{registry.host}/lab/two:v2")

    async with Engine.open(root, Config(retry_delay=0)) as engine:
        one = await engine.pull(refs[0])
        two = await engine.pull(refs[1])

    assert one.stats.payload_bytes == image_bytes(first)
    # The base layer was already there: only the second image's own layer moved.
    assert two.stats.payload_bytes == second.layers[1].size
    assert two.stats.wire_bytes == second.layers[1].size
    counts = await attempts_per_digest(root)
    assert counts[shared] == 1
    assert sum(counts.values()) == 3  # shared + one own layer each

    # Both images in one layout (the root's own), one copy of the shared blob.
    assert {e["annotations"][REF_NAME] for e in index_entries(root)} == {"v1", "v2"}
    for tag, ref in zip(("v1", "v2"), refs, strict=True):
        assert_readable(root, tag, ref, tmp_path)
    assert layer_digests(root, one.digest)[0] == layer_digests(root, two.digest)[0] == shared


async def test_pull_by_digest_verifies_and_names_the_image_by_its_digest(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    pushed = pushed_image(repo="lab/pinned", tag="v1", seed=31)
    pinned = f"{pushed.registry.host}/lab/pinned@{pushed.digest}"
    dest = tmp_path / "oci"
    async with Engine.open(tmp_path / "root", Config(retry_delay=0)) as engine:
        outcome = await engine.pull(pinned, dest=dest)
    assert outcome.digest == pushed.digest
    [entry] = index_entries(dest)
    assert entry["digest"] == pushed.digest
    assert entry["annotations"][IMAGE_NAME] == pinned
    assert entry["annotations"][REF_NAME] == pushed.digest
    # skopeo splits oci:DIR:REF at the first ':' after DIR, so REF may be a digest.
    inspected = assert_readable(dest, pushed.digest, pinned, tmp_path)
    assert inspected["Digest"] == pushed.digest


def test_pull_pinned_to_a_digest_the_registry_does_not_serve_fails_cleanly(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    pushed = pushed_image(repo="lab/pinned", tag="v1", seed=32)
    wrong = "sha256:" + "0" * 64
    done = pull_cli(f"{pushed.registry.host}/lab/pinned@{wrong}", tmp_path / "r", tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "not found" in done.stderr


def test_multiplatform_pull_picks_the_requested_platform(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    pushed = pushed_image(
        repo="lab/multi",
        tag="v1",
        multiplatform=True,
        layers=(LayerSpec(), LayerSpec(compression="zstd")),
        seed=41,
    )
    arm = next(c for c in pushed.image.children if c.platform.architecture == "arm64")
    dest = tmp_path / "oci"
    done = pull_cli(
        pushed.reference, tmp_path / "root", tmp_path, "--platform", "linux/arm64/v8", dest=dest
    )
    assert done.returncode == 0, done.stderr
    # docker pull prints the index digest: that is what the tag points at.
    assert f"Digest: {pushed.image.index_digest}" in done.stdout

    entry = entry_for(dest, "v1")
    assert entry["digest"] == arm.manifest_digest
    assert entry["platform"] == {"os": "linux", "architecture": "arm64", "variant": "v8"}
    inspected = assert_readable(dest, "v1", pushed.reference, tmp_path)
    assert inspected["Architecture"] == "arm64"
    assert inspected["Layers"] == [x.digest for x in arm.layers]
    amd = next(c for c in pushed.image.children if c.platform.architecture == "amd64")
    present = {p.name for p in (dest / "blobs" / "sha256").iterdir()}
    assert not {x.digest[7:] for x in amd.layers} & present  # the other platform stayed away


def test_unavailable_platform_is_a_clear_error_listing_the_platforms(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    pushed = pushed_image(repo="lab/multi", tag="v1", multiplatform=True, seed=42)
    done = pull_cli(pushed.reference, tmp_path / "root", tmp_path, "--platform", "linux/riscv64")
    assert done.returncode in (1, 2), done.stderr
    assert "Traceback" not in done.stderr
    assert "linux/riscv64" in done.stderr
    assert "linux/amd64, linux/arm64/v8" in done.stderr


# ---------------------------------------------------------------------- the ending


def test_cli_ends_like_docker_pull_then_reports_up_to_date(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    pushed = pushed_image(repo="lab/end", tag="v1", seed=51)
    ref = pushed.reference
    args = ("pull", ref, "--root", str(tmp_path / "root"), "--progress", "plain")

    first = run_cli(*args, env=cli_env(tmp_path))
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    tail = lines[-4:]
    assert tail[0] == f"Digest: {pushed.digest}"
    assert tail[1] == f"Status: Downloaded newer image for {ref}"
    assert tail[2] == ref
    assert tail[3].startswith("Stats: payload ")
    assert f"wire {image_bytes(pushed.image)} B" in tail[3]
    assert_readable(tmp_path / "root", "v1", ref, tmp_path)

    second = run_cli(*args, env=cli_env(tmp_path))
    assert second.returncode == 0, second.stderr
    tail = second.stdout.splitlines()[-4:]
    assert tail[0] == f"Digest: {pushed.digest}"
    assert tail[1] == f"Status: Image is up to date for {ref}"
    assert tail[2] == ref
    assert tail[3].startswith("Stats: payload 0 B, wire 0 B")
    assert_readable(tmp_path / "root", "v1", ref, tmp_path)


def test_quiet_pull_prints_only_the_reference(pushed_image: PushImage, tmp_path: Path) -> None:
    pushed = pushed_image(repo="lab/quiet", tag="v1", seed=52)
    done = run_cli(
        "pull", "-q", pushed.reference, "--root", str(tmp_path / "root"), env=cli_env(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == pushed.reference + "\n"
    assert_readable(tmp_path / "root", "v1", pushed.reference, tmp_path)


def test_json_progress_is_dockers_message_stream_ending_with_stats(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    pushed = pushed_image(
        repo="lab/json",
        tag="v1",
        seed=53,
        layers=(LayerSpec(size=2 * MiB, compressible=False), LayerSpec(compression="zstd")),
    )
    done = pull_cli(pushed.reference, tmp_path / "root", tmp_path, progress="json")
    assert done.returncode == 0, done.stderr
    msgs = json_lines(done.stdout)
    ids = {x.digest[7:19] for x in pushed.image.layers}
    layer_msgs = [m for m in msgs if "id" in m and m["id"] in ids]
    assert {m["id"] for m in layer_msgs} == ids
    for m in layer_msgs:
        assert m["status"] in LAYER_STATUSES, m
    seen = {m["status"] for m in layer_msgs}
    assert {"Pulling fs layer", "Downloading", "Download complete", "Pull complete"} <= seen
    downloading = [m for m in layer_msgs if m["status"] == "Downloading"]
    for m in downloading:
        detail = m["progressDetail"]
        assert 0 <= detail["current"] <= detail["total"]
    sizes = {x.digest[7:19]: x.size for x in pushed.image.layers}
    assert {m["progressDetail"]["total"] for m in downloading} <= set(sizes.values())
    assert {"status": f"Digest: {pushed.digest}"} in msgs
    assert {"status": f"Status: Downloaded newer image for {pushed.reference}"} in msgs
    stats = msgs[-1]["stats"]
    assert set(stats) >= {"payload_bytes", "wire_bytes", "wasted_bytes", "attempts", "resumes"}
    assert stats["payload_bytes"] == stats["wire_bytes"] == image_bytes(pushed.image)
    assert stats["wasted_bytes"] == 0 and stats["attempts"] == 2
    assert_readable(tmp_path / "root", "v1", pushed.reference, tmp_path)


def _statuses(events: Sequence[Event]) -> set[str]:
    return {e.status for e in events}


async def test_library_pull_reports_layer_events_and_an_up_to_date_second_pull(
    pushed_image: PushImage, tmp_path: Path
) -> None:
    pushed = pushed_image(repo="lab/lib", tag="v1", seed=54)
    events: list[Event] = []
    async with Engine.open(tmp_path / "root", Config(retry_delay=0)) as engine:
        first = await engine.pull(pushed.reference, on_progress=events.append)
        again = await engine.pull(pushed.reference)
    assert not first.up_to_date and again.up_to_date
    assert first.status == f"Downloaded newer image for {pushed.reference}"
    assert again.status == f"Image is up to date for {pushed.reference}"
    assert {"Pulling fs layer", "Download complete", "Pull complete"} <= _statuses(events)
    assert again.stats.wire_bytes == 0
    assert_readable(tmp_path / "root", "v1", pushed.reference, tmp_path)


async def test_docker_schema2_image_is_stored_byte_for_byte_under_its_own_digest(
    registry: Registry, tmp_path: Path
) -> None:
    """A Docker v2 manifest keeps its media type and digest (no conversion to OCI).

    skopeo 1.9's ``oci:`` transport only looks at index entries typed as OCI manifests or
    indexes ("no descriptor found for reference"), so it cannot read this entry; containerd
    can. The check here is the layout itself: the entry, and every blob verifying.
    """
    image = build_image(tmp_path / "b", (LayerSpec(), LayerSpec()), seed=61, flavour="docker")
    await push_to_registry(registry.url, "lab/docker", "v1", image)
    ref = f"{registry.host}/lab/docker:v1"
    async with Engine.open(tmp_path / "root", Config(retry_delay=0)) as engine:
        await engine.pull(ref, dest=tmp_path / "oci")
    entry = entry_for(tmp_path / "oci", "v1")
    assert entry["mediaType"] == image.manifest_media_type
    assert entry["digest"] == image.manifest_digest
    assert entry["annotations"][IMAGE_NAME] == ref
    assert layer_digests(tmp_path / "oci", image.manifest_digest) == [
        x.digest for x in image.layers
    ]
    assert_blobs_verify(tmp_path / "oci")
