"""Image references normalise exactly as ``docker pull`` does."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from resumer.errors import ReferenceError_
from resumer.registry import Reference, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("library/alpine", "docker.io/library/alpine:latest"),
        ("docker/docker", "docker.io/docker/docker:latest"),
        ("docker.io/debian", "docker.io/library/debian:latest"),
        ("docker.io/library/debian", "docker.io/library/debian:latest"),
        ("index.docker.io/docker/docker", "docker.io/docker/docker:latest"),
        ("index.docker.io/debian", "docker.io/library/debian:latest"),
        ("localhost/foo", "localhost/foo:latest"),
        ("localhost:5000/foo/bar:1", "localhost:5000/foo/bar:1"),
        ("127.0.0.1:5000/debian", "127.0.0.1:5000/debian:latest"),
        ("registry.example.com/team/app:v1.2", "registry.example.com/team/app:v1.2"),
        ("registry.example.com:8443/a/b/c", "registry.example.com:8443/a/b/c:latest"),
        ("[::1]:5000/foo:tag", "[::1]:5000/foo:tag"),
        # An uppercase first component can only be a host: repositories are lowercase.
        ("Example/foo", "Example/foo:latest"),
        ("foo_bar/a__b.c-d---e", "docker.io/foo_bar/a__b.c-d---e:latest"),
        (f"alpine@{D}", f"docker.io/library/alpine@{D}"),
        (f"alpine:3.19@{D}", f"docker.io/library/alpine:3.19@{D}"),
        (f"localhost:5000/app:v1@{D}", f"localhost:5000/app:v1@{D}"),
        ("ubuntu:_Tag.With-Mixed_Case", "docker.io/library/ubuntu:_Tag.With-Mixed_Case"),
    ],
)
def test_reference_normalizes_like_docker(text: str, normalized: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == normalized
    assert parse_reference(normalized) == ref


def test_reference_parts_and_api_host() -> None:
    ref = parse_reference("alpine")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "docker.io",
        "library/alpine",
        "latest",
        None,
    )
    assert ref.api_host == "registry-1.docker.io"
    assert ref.is_docker_hub
    own = parse_reference(f"localhost:5000/team/app:v1@{D}")
    assert (own.registry, own.repository, own.tag, own.digest) == (
        "localhost:5000",
        "team/app",
        "v1",
        D,
    )
    assert own.api_host == "localhost:5000"
    assert not own.is_docker_hub
    # A pinned pull asks for the digest; the tag is informational, as in Docker.
    assert own.manifest_ref == D
    assert parse_reference("alpine:3").manifest_ref == "3"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        (" alpine", "whitespace"),
        ("Alpine", "lowercase"),
        ("foo/Bar", "lowercase"),
        ("a//b", "path component"),
        ("-foo", "path component"),
        ("foo-", "path component"),
        ("foo/.bar", "path component"),
        ("foo:", "tag"),
        ("foo:-tag", "tag"),
        ("foo:" + "t" * 129, "tag"),
        ("foo@sha256:abc", "digest"),
        ("foo@sha256:" + "AB" * 32, "sha256"),
        ("foo@md5:" + "ab" * 16, "sha256"),
        ("host:abc/foo", "registry host"),
        ("-bad.host/foo", "registry host"),
        ("example.com/", "path component"),
        (":tag", "repository"),
        ("a" * 64, "image ID"),
        ("example.com/" + "a" * 250, "longer than 255"),
    ],
)
def test_bad_references_are_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(ReferenceError_) as info:
        parse_reference(text)
    assert why in str(info.value)
    assert info.value.exit_code == 2


# ---- properties ------------------------------------------------------------------------

_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "--"])
_component = st.builds(
    lambda first, rest: first + "".join(s + a for s, a in rest),
    _alnum,
    st.lists(st.tuples(_separator, _alnum), max_size=2),
)
_host = st.one_of(
    st.just("localhost"),
    st.builds(lambda a, b: f"{a}.{b}", _alnum, _alnum),
    st.builds(lambda a: f"{a}.example", _alnum),
)
_registry = st.one_of(
    st.just("docker.io"),
    st.builds(
        lambda h, p: h if p is None else f"{h}:{p}",
        _host,
        st.none() | st.integers(1, 65535),
    ),
)
_tag = st.from_regex(r"\A[\w][\w.-]{0,20}\Z", fullmatch=True).filter(str.isascii)
_digest = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: f"sha256:{h}")


@st.composite
def references(draw: st.DrawFn) -> Reference:
    registry = draw(_registry)
    # Hub names always have a namespace after normalisation (library/…).
    parts = draw(st.lists(_component, min_size=2 if registry == "docker.io" else 1, max_size=3))
    tag = draw(st.none() | _tag)
    digest = draw(st.none() | _digest)
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, "/".join(parts), tag, digest)


@given(references())
def test_normalized_references_round_trip(ref: Reference) -> None:
    assert parse_reference(str(ref)) == ref


@given(st.text("abcAB019.-_:/@[]", max_size=40))
def test_parsing_is_idempotent_on_whatever_parses(text: str) -> None:
    try:
        ref = parse_reference(text)
    except ReferenceError_:
        return
    assert parse_reference(str(ref)) == ref


@given(_component, st.none() | _tag, st.none() | _digest)
def test_short_hub_names_gain_library_prefix(
    name: str, tag: str | None, digest: str | None
) -> None:
    suffix = (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    assume(not (tag is None and len(name) == 64))  # would be an image ID
    assert parse_reference(name + suffix) == parse_reference(f"docker.io/library/{name}{suffix}")
    assert parse_reference(name + suffix).repository == f"library/{name}"
