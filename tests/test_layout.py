"""resumer.layout: the OCI image layout at the root of resumer."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from pathlib import Path

import pytest
from servers import SKOPEO_BIN, require, skopeo_copy, skopeo_inspect

from resumer.digest import Digest
from resumer.errors import DigestMismatchError, StoreError
from resumer.lab.images import BuiltImage, LayerSpec, build_image, build_multiplatform
from resumer.layout import IMAGE_NAME, REF_NAME, STALE_TMP_SECONDS, Layout

SMALL = (LayerSpec(size=20_000), LayerSpec(size=10_000, compression="zstd"))


async def store(layout: Layout, image: BuiltImage, tag: str, name: str) -> None:
    """What a pull does at the end: blobs first, then the index entry."""
    for digest, content in image.blobs():
        if isinstance(content, Path):
            await layout.link_blob_from(content, digest)
        else:
            await layout.add_blob_bytes(content, digest)
    await layout.add_image(image.descriptor(), ref_name=tag, image_name=name)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    lay = Layout(tmp_path / "root")
    lay.ensure()
    return lay


def test_ensure_creates_an_empty_layout_and_is_idempotent(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "root")
    lay.ensure()
    assert json.loads((lay.path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert lay.blobs_dir.is_dir()
    index = json.loads(lay.index_path.read_text())
    assert index == {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [],
    }
    lay.index_path.write_text(json.dumps({**index, "manifests": []}) + " ")
    before = lay.index_path.read_bytes()
    lay.ensure()  # must not reset an existing index
    assert lay.index_path.read_bytes() == before
    assert lay.images() == []


async def test_add_blob_bytes_refuses_content_that_does_not_match(layout: Layout) -> None:
    data = b'{"hello": 1}'
    wrong = str(Digest.of(b"other"))
    with pytest.raises(DigestMismatchError):
        await layout.add_blob_bytes(data, wrong)
    assert list(layout.blobs_dir.iterdir()) == []
    d = await layout.add_blob_bytes(data, str(Digest.of(data)))
    assert layout.blob_path(d).read_bytes() == data
    assert layout.has_blob(d, len(data))
    assert not layout.has_blob(d, len(data) + 1)
    assert await layout.add_blob_bytes(data) == d  # already there: success


def test_blob_path_rejects_digests_that_would_escape(layout: Layout) -> None:
    with pytest.raises(Exception, match="invalid digest"):
        layout.blob_path("sha256:../../etc/passwd")


async def test_add_image_replaces_the_entry_with_the_same_ref(
    layout: Layout, tmp_path: Path
) -> None:
    a = build_image(tmp_path / "b", SMALL, seed=1)
    b = build_image(tmp_path / "b", SMALL, seed=2)
    await store(layout, a, "v1", "reg.example/app:v1")
    await store(layout, b, "v2", "reg.example/app:v2")
    await store(layout, b, "v1", "reg.example/app:v1")
    entries = {e.ref_name: e for e in layout.images()}
    assert set(entries) == {"v1", "v2"}
    assert entries["v1"].digest == b.manifest_digest
    assert entries["v1"].image_name == "reg.example/app:v1"
    assert entries["v1"].descriptor["annotations"] == {
        REF_NAME: "v1",
        IMAGE_NAME: "reg.example/app:v1",
    }
    assert entries["v2"].media_type == b.manifest_media_type


async def test_two_images_share_their_base_blobs(layout: Layout, tmp_path: Path) -> None:
    base = build_image(tmp_path / "b", SMALL, seed=3)
    child = build_image(tmp_path / "b", [LayerSpec(size=5_000)], seed=4, base=base)
    await store(layout, base, "base", "reg.example/base:base")
    await store(layout, child, "child", "reg.example/child:child")
    unique = {d for img in (base, child) for d, _ in img.blobs()}
    assert {p.name for p in layout.blobs_dir.iterdir()} == {d[7:] for d in unique}
    # Hardlinked from the build dir, not copied.
    shared = base.layers[0]
    assert layout.blob_path(shared.digest).stat().st_ino == shared.path.stat().st_ino


async def test_add_image_refuses_a_manifest_that_is_not_stored(
    layout: Layout, tmp_path: Path
) -> None:
    img = build_image(tmp_path / "b", SMALL, seed=5)
    with pytest.raises(StoreError, match="not in the layout"):
        await layout.add_image(img.descriptor(), ref_name="v1", image_name="x/y:v1")
    assert layout.images() == []


async def test_concurrent_add_image_loses_no_update(layout: Layout) -> None:
    digests = [await layout.add_blob_bytes(f"manifest {i}".encode()) for i in range(24)]
    other = Layout(layout.path)  # a second object on the same directory shares the lock
    await asyncio.gather(
        *(
            (layout if i % 2 else other).add_image(
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": d,
                    "size": len(f"manifest {i}"),
                },
                ref_name=f"t{i}",
                image_name=f"r/x:t{i}",
            )
            for i, d in enumerate(digests)
        )
    )
    assert sorted(e.ref_name or "" for e in layout.images()) == sorted(f"t{i}" for i in range(24))


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"schemaVersion": 1, "manifests": []}', "schemaVersion"),
        (b'{"schemaVersion": 2, "manifests": {}}', "not a list"),
        (b'{"schemaVersion": 2, "manifests": [{"digest": "sha256:zz"}]}', "manifests\\[0\\]"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
async def test_corrupt_index_json_is_a_store_error_naming_the_file(
    layout: Layout, content: bytes, cause: str
) -> None:
    layout.index_path.write_bytes(content)
    with pytest.raises(StoreError, match=cause) as info:
        layout.images()
    assert str(layout.index_path) in str(info.value)
    d = await layout.add_blob_bytes(b"m")
    with pytest.raises(StoreError, match=r"index\.json"):
        await layout.add_image(
            {"mediaType": "x/y", "digest": d, "size": 1}, ref_name="t", image_name="r:t"
        )
    assert layout.index_path.read_bytes() == content  # never overwritten with a guess


async def test_stale_temp_files_are_ignored_and_old_ones_cleaned(layout: Layout) -> None:
    fresh = layout.path / ".index.json.fresh.tmp"
    old = layout.path / ".index.json.old.tmp"
    old_blob = layout.blobs_dir / ".abc.old.tmp"
    for p in (fresh, old, old_blob):
        p.write_bytes(b"{torn")
    past = time.time() - STALE_TMP_SECONDS - 60
    os.utime(old, (past, past))
    os.utime(old_blob, (past, past))
    d = await layout.add_blob_bytes(b"m")
    await layout.add_image(
        {"mediaType": "x/y", "digest": d, "size": 1}, ref_name="t", image_name="r:t"
    )
    assert [e.ref_name for e in layout.images()] == ["t"]
    layout.ensure()
    assert fresh.exists()  # may belong to a write in progress
    assert not old.exists() and not old_blob.exists()


async def test_a_failed_index_write_leaves_the_old_index_intact(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = await layout.add_blob_bytes(b"m")
    desc = {"mediaType": "x/y", "digest": d, "size": 1}
    await layout.add_image(desc, ref_name="old", image_name="r:old")
    before = layout.index_path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="simulated crash"):
        await layout.add_image(desc, ref_name="new", image_name="r:new")
    monkeypatch.undo()
    assert layout.index_path.read_bytes() == before
    assert [p.name for p in layout.path.iterdir() if p.name.endswith(".tmp")] == []


async def test_link_blob_from_copies_and_verifies_across_filesystems(
    layout: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "blob"
    src.write_bytes(b"layer bytes" * 1000)
    good = str(Digest.of(src.read_bytes()))

    def no_link(a: object, b: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    bad = str(Digest.of(b"something else"))
    with pytest.raises(DigestMismatchError):
        await layout.link_blob_from(src, bad)
    assert not layout.has_blob(bad)
    dest = await layout.link_blob_from(src, good)
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_ino != src.stat().st_ino
    assert await layout.link_blob_from(src, good) == dest  # exists: success
    assert [p.name for p in layout.blobs_dir.iterdir()] == [good[7:]]


async def test_skopeo_reads_a_layout_written_by_layout(layout: Layout, tmp_path: Path) -> None:
    require(SKOPEO_BIN)
    single = build_image(tmp_path / "b", SMALL, seed=6)
    multi = build_multiplatform(tmp_path / "b", [LayerSpec(size=8_000)], seed=7)
    await store(layout, single, "single", "reg.example/app:single")
    await store(layout, multi, "multi", "reg.example/app:multi")
    info = await asyncio.to_thread(skopeo_inspect, f"oci:{layout.path}:single")
    assert info["Digest"] == single.manifest_digest
    assert info["Layers"] == [layer.digest for layer in single.layers]
    raw = await asyncio.to_thread(skopeo_inspect, f"oci:{layout.path}:multi", raw=True)
    assert [m["digest"] for m in raw["manifests"]] == [c.manifest_digest for c in multi.children]
    # A full copy makes skopeo read and verify every blob of every platform.
    await asyncio.to_thread(
        skopeo_copy, f"oci:{layout.path}:multi", f"oci:{tmp_path / 'copy'}:multi", "--all"
    )


async def test_images_with_the_same_tag_from_two_repositories_live_side_by_side(
    layout: Layout, tmp_path: Path
) -> None:
    a = build_image(tmp_path / "b", SMALL, seed=1)
    b = build_image(tmp_path / "b", SMALL, seed=2)
    await store(layout, a, "latest", "reg.example/a:latest")
    await store(layout, b, "latest", "reg.example/b:latest")
    assert {e.image_name: e.digest for e in layout.images()} == {
        "reg.example/a:latest": a.manifest_digest,
        "reg.example/b:latest": b.manifest_digest,
    }
    # Pulling a again (the tag moved) replaces a's entry only.
    await store(layout, b, "latest", "reg.example/a:latest")
    assert {e.image_name: e.digest for e in layout.images()} == {
        "reg.example/a:latest": b.manifest_digest,
        "reg.example/b:latest": b.manifest_digest,
    }
