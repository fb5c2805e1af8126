"""Platforms: ``os/arch[/variant]`` normalised, parsed and matched as containerd does."""

from __future__ import annotations

import platform as host_platform
from dataclasses import dataclass

from ..errors import ReferenceError_


@dataclass(frozen=True, order=True)
class Platform:
    """``os/arch[/variant]``, normalised the way containerd compares them."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


_ARCH_ALIASES = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armel": ("arm", "v6"),
    "armv5l": ("arm", "v5"),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "386": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""),
    "mips64el": ("mips64le", ""),
    "loongarch64": ("loong64", ""),
}


def normalize_platform(os_name: str, arch: str, variant: str = "") -> Platform:
    """Apply containerd's aliases: aarch64 → arm64/v8, x86_64 → amd64, armhf → arm/v7 …"""
    os_name = os_name.lower()
    arch = arch.lower()
    variant = variant.lower()
    if arch in _ARCH_ALIASES:
        canon, implied = _ARCH_ALIASES[arch]
        arch, variant = canon, variant or implied
    if arch == "arm64" and variant in ("", "8"):
        variant = "v8"  # arm64 and arm64/v8 are the same platform
    if arch == "arm" and variant in ("5", "6", "7", "8"):
        variant = "v" + variant
    return Platform(os_name, arch, variant)


def parse_platform(text: str) -> Platform:
    """``linux/arm64``, ``linux/arm/v7`` → Platform; anything else is a usage error."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ReferenceError_(
            f"invalid platform {text!r}: expected OS/ARCH or OS/ARCH/VARIANT, "
            "for example linux/amd64"
        )
    return normalize_platform(*parts)


def host_platform_default() -> Platform:
    """The platform ``docker pull`` would pick here: linux on this machine's arch."""
    return normalize_platform("linux", host_platform.machine() or "amd64")


def _platform_candidates(wanted: Platform) -> list[Platform]:
    """What satisfies ``wanted``, best first: arm/v7 also runs v6 and v5 images."""
    if wanted.architecture == "arm" and wanted.variant in ("v8", "v7", "v6", "v5"):
        order = ["v8", "v7", "v6", "v5"]
        return [Platform(wanted.os, "arm", v) for v in order[order.index(wanted.variant) :]]
    return [wanted]


def _matches(entry: Platform, candidate: Platform, *, any_variant: bool) -> bool:
    if (entry.os, entry.architecture) != (candidate.os, candidate.architecture):
        return False
    return any_variant or entry.variant == candidate.variant
