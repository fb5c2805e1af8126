"""resumer.register: diffIDs of committed layers, decompression limits, chain IDs."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import tracemalloc
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from resumer.errors import RegistrationError
from resumer.lab.images import LayerSpec, make_layer
from resumer.register import (
    chain_ids,
    compression_of,
    compute_diff_id,
    diff_id_of,
    verify_diff_id,
)

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA = {"gzip": OCI_GZIP, "zstd": OCI_ZSTD, "none": OCI_TAR}
BIG = 1 << 40


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gzip_members(data: bytes, cuts: list[int]) -> bytes:
    """``data`` as several concatenated gzip members, split at ``cuts``."""
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return b"".join(gzip.compress(data[a:b], mtime=0) for a, b in itertools.pairwise(bounds))


def zstd_frames(data: bytes, cuts: list[int]) -> bytes:
    """Several zstd frames, without content size (as streaming writers produce)."""
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    out = b""
    for a, b in itertools.pairwise(bounds):
        obj = cctx.compressobj()
        out += obj.compress(data[a:b]) + obj.flush()
    return out


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("compressible", [True, False])
async def test_diff_id_is_the_sha256_of_the_uncompressed_tar(
    tmp_path: Path, compression: str, compressible: bool
) -> None:
    spec = LayerSpec(size=3 << 20, compression=compression, compressible=compressible)  # type: ignore[arg-type]
    layer = make_layer(tmp_path, spec, seed=11)
    blob = layer.path.read_bytes()
    # An independent decoder is the oracle for what the tar is.
    if compression == "gzip":
        tar = gzip.decompress(blob)
    elif compression == "zstd":
        tar = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    else:
        tar = blob
    assert tar[257:262] == b"ustar"
    got = await compute_diff_id(layer.path, layer.media_type, max_uncompressed=BIG)
    assert got == sha(tar) == layer.diff_id


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(max_size=40_000) | st.text(max_size=20_000).map(str.encode),
    kind=st.sampled_from(["gzip", "zstd", "none"]),
    cuts=st.lists(st.integers(min_value=0), max_size=3),
    sniff=st.booleans(),
)
def test_diff_id_of_any_content_in_any_framing(
    tmp_path: Path, data: bytes, kind: str, cuts: list[int], sniff: bool
) -> None:
    if kind == "gzip":
        blob = gzip_members(data, cuts)
    elif kind == "zstd":
        blob = zstd_frames(data, cuts)
    else:
        blob = data
        # Unknown media types are sniffed; a plain tar never starts with these magics.
        assume(
            not (sniff and (blob.startswith(b"\x1f\x8b") or blob.startswith(b"\x28\xb5\x2f\xfd")))
        )
    media = DOCKER_GZIP if sniff else MEDIA[kind]
    path = tmp_path / "blob"
    path.write_bytes(blob)
    assert diff_id_of(path, media, max_uncompressed=BIG) == sha(data)


def test_zero_padding_after_the_last_gzip_member_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(gzip_members(b"hello world" * 100, [500]) + b"\0" * 1024)
    assert diff_id_of(path, OCI_GZIP, max_uncompressed=BIG) == sha(b"hello world" * 100)


def test_docker_media_type_carrying_zstd_is_sniffed(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(zstd_frames(b"abc" * 1000, []))
    assert compression_of(DOCKER_GZIP, path.read_bytes()[:4]) == "zstd"
    assert diff_id_of(path, DOCKER_GZIP, max_uncompressed=BIG) == sha(b"abc" * 1000)


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_decompression_bomb_stops_at_the_limit_with_bounded_memory(
    tmp_path: Path, kind: str
) -> None:
    size = 192 << 20  # 192 MiB of zeros: a few hundred KiB compressed
    if kind == "gzip":
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        blob = b"".join(c.compress(bytes(1 << 20)) for _ in range(size >> 20)) + c.flush()
    elif kind == "zstd":
        c2 = zstandard.ZstdCompressor(write_content_size=False).compressobj()
        blob = b"".join(c2.compress(bytes(1 << 20)) for _ in range(size >> 20)) + c2.flush()
    else:
        blob = bytes(size)
    path = tmp_path / ("a" * 64)
    path.write_bytes(blob)
    del blob
    tracemalloc.start()
    try:
        with pytest.raises(RegistrationError) as info:
            diff_id_of(path, MEDIA[kind], max_uncompressed=size - 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value) == (
        f"layer sha256:{'a' * 64}: uncompressed size exceeds {size - 1} bytes (decompression bomb?)"
    )
    assert peak < 8 << 20, f"peak {peak} bytes while inflating {size} bytes"
    # Exactly at the limit is allowed.
    assert diff_id_of(path, MEDIA[kind], max_uncompressed=size) == sha(bytes(size))


def _corruptions() -> list[tuple[str, str, bytes]]:
    data = bytes(range(256)) * 400
    gz = gzip.compress(data, mtime=0)
    zs = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    mid = len(gz) // 2
    return [
        ("gzip", "truncated", gz[:-9]),
        (
            "gzip",
            "bit flip in the deflate data",
            gz[:mid] + bytes([gz[mid] ^ 0x40]) + gz[mid + 1 :],
        ),
        ("gzip", "bad crc", gz[:-8] + b"\0\0\0\0" + gz[-4:]),
        ("gzip", "not gzip at all", b"\x1f\x8b\x08\x00garbage" + bytes(100)),
        ("gzip", "empty file", b""),
        ("gzip", "garbage after the last member", gz + b"PK\x03\x04"),
        ("zstd", "truncated", zs[:-7]),
        ("zstd", "truncated in the frame header", zs[:5]),
        ("zstd", "bad checksum", zs[:-4] + bytes(b ^ 0xFF for b in zs[-4:])),
        ("zstd", "garbage block", zs[:6] + b"\xff" * 64),
        ("zstd", "empty file", b""),
        ("zstd", "garbage after the last frame", zs + b"\0\0\0\0\0\0"),
    ]


@pytest.mark.parametrize(("kind", "what", "blob"), _corruptions(), ids=lambda v: str(v)[:30])
def test_corrupt_layers_raise_registration_error_naming_the_layer(
    tmp_path: Path, kind: str, what: str, blob: bytes
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    digest = sha(blob)
    with pytest.raises(RegistrationError, match=f"^layer {digest}: corrupt {kind} data"):
        diff_id_of(path, MEDIA[kind], max_uncompressed=BIG, digest=digest)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kind=st.sampled_from(["gzip", "zstd"]), cut=st.floats(min_value=0.0, max_value=0.9999))
def test_any_truncation_of_a_single_member_layer_is_detected(
    tmp_path: Path, kind: str, cut: float
) -> None:
    data = b"".join(b"line %d of some layer\n" % i for i in range(3000))
    if kind == "gzip":
        blob = gzip.compress(data, mtime=0)
    else:
        blob = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / "blob"
    path.write_bytes(blob[: int(len(blob) * cut)])
    with pytest.raises(RegistrationError, match="corrupt"):
        diff_id_of(path, MEDIA[kind], max_uncompressed=BIG)


def test_unreadable_blob_is_a_registration_error(tmp_path: Path) -> None:
    with pytest.raises(RegistrationError, match="cannot read"):
        diff_id_of(tmp_path / "missing", OCI_GZIP, max_uncompressed=BIG, digest=sha(b""))


async def test_verify_diff_id_rejects_a_layer_that_does_not_match_its_config(
    tmp_path: Path,
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(gzip.compress(b"content", mtime=0))
    await verify_diff_id(path, OCI_GZIP, sha(b"content"), max_uncompressed=BIG)
    with pytest.raises(RegistrationError, match="image config says"):
        await verify_diff_id(path, OCI_GZIP, sha(b"other"), max_uncompressed=BIG)


def test_chain_ids_match_a_hand_computed_vector() -> None:
    # printf 'layer-a' | sha256sum, etc.; then printf '%s %s' PARENT DIFFID | sha256sum
    a = "sha256:589f0d58b9053a4ff7329b8fdb4f9dd120e29354c086ad0b3b10733f6cfd6de3"
    b = "sha256:55fea2a37a9fc5963f1beccd0d162b856e6bd05ca07cdd3726847846ab740f0d"
    c = "sha256:e6c65c655ca8172ab7a2b634dab3220a45472dd6571b6efd956ccc05e229a201"
    assert chain_ids([a, b, c]) == [
        a,
        "sha256:267c5fd16af60e52927fabf0a36a31f3b5a2069347f7f00c7bd7f93f6ebc01f4",
        "sha256:82c0ed5f6c15be9b9180a8c04b9f2c676d74af6db13c711f5bb47a0fa43b56df",
    ]
    assert chain_ids([]) == []
    # A repeated layer gets a new chain ID on its own parent.
    assert len(set(chain_ids([a, a]))) == 2
