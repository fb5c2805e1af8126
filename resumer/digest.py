"""Digests: parsing ``sha256:<hex>``, chain IDs, and xxh3 values in SQLite's integer range."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import UsageError

_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


@dataclass(frozen=True, order=True)
class Digest:
    """A sha256 content digest."""

    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        m = _DIGEST.match(text.strip())
        if not m:
            raise UsageError(f"invalid digest {text!r}: expected sha256:<64 lowercase hex digits>")
        return cls(m.group(1))

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest())

    def __str__(self) -> str:
        return f"sha256:{self.hex}"


def to_signed(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def chain_id(parent: str | None, diff_id: str) -> str:
    """OCI ChainID: ChainID(L0) = DiffID(L0);
    ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
