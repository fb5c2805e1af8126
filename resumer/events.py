"""The library's output contract: layer statuses, progress events, run statistics.

Everything a caller of the library receives, and nothing that draws it: the renderers
(tty, plain, json) live in progress.py, the CLI's face. This module imports nothing of
ours, so every layer may depend on it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


class Status(enum.StrEnum):
    """The statuses docker pull shows, in the order a layer normally meets them.

    A StrEnum: the value is the text docker prints, so JSON output and comparisons with
    docker's strings keep working.
    """

    PULLING_FS_LAYER = "Pulling fs layer"
    WAITING = "Waiting"
    DOWNLOADING = "Downloading"
    RESUMING = "Resuming from"  # rendered "Resuming from N"
    RETRYING = "Retrying in"  # rendered "Retrying in N seconds"
    VERIFYING = "Verifying Checksum"
    DOWNLOAD_COMPLETE = "Download complete"
    EXTRACTING = "Extracting"
    PULL_COMPLETE = "Pull complete"
    ALREADY_EXISTS = "Already exists"


@dataclass(frozen=True)
class Event:
    """One state change of one layer (``id`` = 12 hex digits of its digest) or of the pull."""

    id: str
    #: a layer's Status, or a pull-level line docker prints as is ("Digest: sha256:…")
    status: Status | str
    current: int | None = None
    total: int | None = None
    #: the number in "Resuming from N" or "Retrying in N seconds"
    value: int | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        if self.status == Status.RESUMING:
            return f"Resuming from {self.value}"
        if self.status == Status.RETRYING:
            return f"Retrying in {self.value} second{'s' if self.value != 1 else ''}"
        return str(self.status)

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error, "errorDetail": {"message": self.error}}
        out: dict[str, Any] = {"status": self.text}
        if self.id:
            out["id"] = self.id
        if self.current is not None:
            out["progressDetail"] = {"current": self.current, "total": self.total}
        return out


ProgressCallback = Callable[[Event], None]


def ignore(_: Event) -> None:
    """A callback that drops every event."""


@dataclass
class Stats:
    """What a run cost: the numbers both the vendor and the operator ask for."""

    payload_bytes: int = 0  # size of the blobs this run made complete
    wire_bytes: int = 0  # body bytes received
    wasted_bytes: int = 0  # received and thrown away, for any reason
    attempts: int = 0
    resumes: int = 0  # attempts that started at an offset > 0
    discards: dict[str, int] = field(default_factory=dict)

    def discard(self, nbytes: int, reason: str) -> None:
        """Book ``nbytes`` received and thrown away for ``reason`` (adding, never replacing)."""
        if nbytes > 0:
            self.wasted_bytes += nbytes
            self.discards[reason] = self.discards.get(reason, 0) + nbytes

    def add(self, other: Stats) -> None:
        self.payload_bytes += other.payload_bytes
        self.wire_bytes += other.wire_bytes
        self.wasted_bytes += other.wasted_bytes
        self.attempts += other.attempts
        self.resumes += other.resumes
        for k, v in other.discards.items():
            self.discards[k] = self.discards.get(k, 0) + v

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("discards")
        return d
