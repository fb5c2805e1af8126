"""The one frozen Config, shared by the library, the CLI flags and the config file.

Precedence: flag, then environment (``RESUMER_<KEY>``), then the JSON config file
(dockerd's key names), then the default.

Sizes (``partial-budget-bytes``, ``--partial-budget``; ``max-download-rate`` in bytes/s;
``max-wire-bytes``) are plain bytes or a number with a unit, parsed by ``parse_size``:
K, M, G, T are 1024-based, as in curl, aria2 and docker (``KB``/``KiB`` mean the same),
so ``16GiB`` = ``16G`` = 17179869184 bytes.
"""

from __future__ import annotations

import dataclasses
import decimal
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
#: The most seconds any time option may say (about 31 years): anything above is a typo,
#: and n × retry-delay must stay a finite number.
MAX_SECONDS = 1e9
#: A smaller partial budget would let the next start delete nearly every partial.
MIN_PARTIAL_BUDGET = 64 * MiB


@dataclass(frozen=True)
class Config:
    """Every tunable of resumer. Invalid values are refused at construction."""

    max_download_attempts: int = 5
    max_concurrent_downloads: int = 3
    #: connections per blob, each a bounded Range of its holes (1: one stream, as docker;
    #: 4 by measurement: README, "Parallel segments")
    max_connections_per_blob: int = 4
    #: a range smaller than this is never split off (aria2's min-split-size)
    min_segment_size: int = 4 * MiB
    #: extra connections (beyond one per transfer) of the whole process, at most
    max_extra_connections: int = 16
    retry_delay: float = 5.0
    stall_timeout: float = 30.0
    #: bytes/s; an attempt slower than this for low_speed_time seconds is a stall (0 = off)
    low_speed_limit: int = 1024
    low_speed_time: float = 60.0
    connect_timeout: float = 30.0
    chunk_size: int = 1 * MiB
    checkpoint_bytes: int = 4 * MiB
    checkpoint_seconds: float = 2.0
    #: False turns off fdatasync and chunk records: for benchmarks only
    checkpoints: bool = True
    #: disk that partials may use; gc removes the oldest idle partials beyond it
    partial_budget_bytes: int = 16 * 1024 * MiB
    #: refuse to inflate a layer beyond this many bytes (decompression bombs)
    max_uncompressed_bytes: int = 64 * 1024 * MiB
    #: bytes/s for every transfer of the process together (one token bucket); 0 = unlimited
    max_download_rate: int = 0
    #: body bytes one run may receive, every transfer together; then it stops, partials
    #: kept, and the next run continues (0 = no budget)
    max_wire_bytes: int = 0
    registry_mirrors: tuple[str, ...] = ()
    insecure_registries: tuple[str, ...] = ()
    platform: str | None = None
    progress: str = "auto"

    def __post_init__(self) -> None:
        if self.max_download_attempts < 1:
            raise ConfigError(
                f"max-download-attempts must be at least 1, got {self.max_download_attempts}"
            )
        if self.max_concurrent_downloads < 1:
            raise ConfigError(
                f"max-concurrent-downloads must be at least 1, got {self.max_concurrent_downloads}"
            )
        if not 1 <= self.max_connections_per_blob <= 16:
            raise ConfigError(
                f"max-connections-per-blob must be 1 to 16, got {self.max_connections_per_blob}"
            )
        if self.min_segment_size < self.chunk_size:
            raise ConfigError(
                f"min-segment-size must be at least the chunk size ({self.chunk_size}), "
                f"got {self.min_segment_size}"
            )
        if self.max_extra_connections < 0:
            raise ConfigError(
                f"max-extra-connections must not be negative, got {self.max_extra_connections}"
            )
        for name in _FLOAT_FIELDS:
            _check_seconds(name.replace("_", "-"), getattr(self, name))
        if self.low_speed_limit < 0:
            raise ConfigError(f"low-speed-limit must not be negative, got {self.low_speed_limit}")
        if self.partial_budget_bytes < 0:
            # The CLI, environment and file insist on MIN_PARTIAL_BUDGET (see build);
            # the library lets a caller (a test) ask for less.
            raise ConfigError(
                f"partial-budget-bytes must not be negative, got {self.partial_budget_bytes}"
            )
        for option, value in (
            ("max-download-rate", self.max_download_rate),
            ("max-wire-bytes", self.max_wire_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{option} must be a whole number of bytes ≥ 0, got {value!r}")
        share = self.low_speed_limit * self.max_concurrent_downloads
        if self.max_download_rate and self.low_speed_time and self.max_download_rate < share:
            # Each running transfer would get less than the low-speed limit and fail as
            # "too slow" on every attempt, spending its budget on the rate cap's account.
            raise ConfigError(
                f"max-download-rate {self.max_download_rate} B/s is below low-speed-limit "
                f"({self.low_speed_limit} B/s) × max-concurrent-downloads "
                f"({self.max_concurrent_downloads}): every transfer would fail as too slow; "
                "raise the rate, or lower --low-speed-limit (0 turns it off)"
            )
        if self.chunk_size < 4096 or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"chunk-size must be a power of two ≥ 4096, got {self.chunk_size}")
        if self.progress not in ("auto", "tty", "plain", "json", "none"):
            raise ConfigError(
                f"progress must be auto, tty, plain, json or none, got {self.progress!r}"
            )

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


# dockerd's names in the config file → Config fields.
_FILE_KEYS = {
    "max-download-attempts": "max_download_attempts",
    "max-concurrent-downloads": "max_concurrent_downloads",
    "max-connections-per-blob": "max_connections_per_blob",
    "min-segment-size": "min_segment_size",
    "registry-mirrors": "registry_mirrors",
    "insecure-registries": "insecure_registries",
    "retry-delay": "retry_delay",
    "stall-timeout": "stall_timeout",
    "low-speed-limit": "low_speed_limit",
    "low-speed-time": "low_speed_time",
    "chunk-size": "chunk_size",
    "partial-budget-bytes": "partial_budget_bytes",
    "max-download-rate": "max_download_rate",
    "max-wire-bytes": "max_wire_bytes",
    "platform": "platform",
    "progress": "progress",
}
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
#: every float option is a number of seconds: finite, ≥ 0, at most MAX_SECONDS
_FLOAT_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.type == "float")
#: options given as sizes (parse_size), with the least each may be set to by a user
_SIZE_MINIMUMS = {
    "partial_budget_bytes": MIN_PARTIAL_BUDGET,
    "min_segment_size": 4096,
    "max_download_rate": 0,
    "max_wire_bytes": 0,
}
#: the command-line flag of an option whose flag is not ``--<file key>``
_FLAG_NAMES = {"partial_budget_bytes": "--partial-budget"}

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    **{u: KiB for u in ("k", "kb", "kib")},
    **{u: MiB for u in ("m", "mb", "mib")},
    **{u: GiB for u in ("g", "gb", "gib")},
    **{u: GiB << 10 for u in ("t", "tb", "tib")},
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", re.ASCII)
#: SQLite's integers end here; no disk is this big
_MAX_SIZE = (1 << 63) - 1
SIZE_HELP = "bytes, or a number with K, M, G or T (1024-based; KiB, MiB, GiB, TiB also accepted)"


def parse_size(value: Any, *, option: str) -> int:
    """Bytes from ``16GiB``, ``512M``, ``1.5G``, ``10k``, ``4096`` or a JSON number.

    K, M, G and T are powers of 1024 whatever the case or the ``B``/``iB`` after them
    (curl's, aria2's and docker's reading); a fraction is rounded down to whole bytes.
    ``ConfigError`` naming ``option`` for anything else: negative, non-finite, garbage.
    """
    number: decimal.Decimal | int
    factor = 1
    if isinstance(value, bool):
        raise ConfigError(f"{option}: invalid size {value!r}: use {SIZE_HELP}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ConfigError(f"{option}: invalid size {value!r}: use a whole number of bytes")
        number = int(value)
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ConfigError(f"{option}: invalid size {value!r}: use {SIZE_HELP}")
        number, factor = decimal.Decimal(m.group(1)), _SIZE_UNITS[unit]
    else:
        raise ConfigError(f"{option}: invalid size {value!r}: use {SIZE_HELP}")
    if number < 0:
        raise ConfigError(f"{option}: a size must not be negative, got {value!r}")
    if number > _MAX_SIZE:  # before multiplying: "9" * 10000 stays cheap
        raise ConfigError(f"{option}: size {value!r} is too large")
    size = int(number * factor)
    if size > _MAX_SIZE:
        raise ConfigError(f"{option}: size {value!r} is too large")
    return size


def format_size(n: int) -> str:
    """``64 MiB``, ``16 GiB``, ``1536 B``: the largest unit that divides ``n`` exactly."""
    for unit, factor in (("TiB", GiB << 10), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"


def _check_size(name: str, value: int, option: str) -> None:
    least = _SIZE_MINIMUMS.get(name)
    if least is not None and value < least:
        raise ConfigError(
            f"{option} must be at least {format_size(least)} ({least} bytes), "
            f"got {format_size(value)}"
        )


def _check_seconds(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{option} must be a number of seconds, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number of seconds, got {value!r}")
    if value < 0:
        raise ConfigError(f"{option} must not be negative, got {value!r}")
    if value > MAX_SECONDS:
        raise ConfigError(f"{option} must be at most {MAX_SECONDS:g} seconds, got {value!r}")


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _FIELDS[name].type
    flag = name.replace("_", "-")
    if name in _SIZE_MINIMUMS:
        size = parse_size(value, option=f"{source}: {flag}")
        _check_size(name, size, f"{source}: {flag}")
        return size
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            seconds = float(value)
            try:
                _check_seconds(flag, seconds)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
            return seconds
        if kind == "bool":
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind.startswith("tuple"):
            if isinstance(value, str):
                return tuple(v for v in (p.strip() for p in value.split(",")) if v)
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return tuple(value)
        if value is not None and not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{source}: invalid value {value!r} for {flag}") from exc


def load_file(path: Path) -> dict[str, Any]:
    """Read a dockerd-style JSON config file into Config field values."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path}: not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc}") from exc
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ConfigError(f"config file {path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a JSON object")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = _FILE_KEYS.get(key)
        if name is None:
            continue  # dockerd's file holds many keys that are not ours
        out[name] = _coerce(name, value, f"config file {path}")
    return out


def load_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """``RESUMER_MAX_DOWNLOAD_ATTEMPTS=3`` and friends."""
    out: dict[str, Any] = {}
    for key, name in _FILE_KEYS.items():
        env = "RESUMER_" + key.upper().replace("-", "_")
        if env in environ:
            out[name] = _coerce(name, environ[env], f"environment {env}")
    return out


def build(
    flags: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge default < file < environment < flags (flags set to None are absent).

    A size flag may be a string with a unit (``--partial-budget 16GiB``); every value
    is checked here with the flag, variable or file that gave it named in the error.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_file(config_file))
    values.update(load_env(os.environ if environ is None else environ))
    for name, value in flags.items():
        if value is None:
            continue
        option = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        if name in _SIZE_MINIMUMS:
            value = parse_size(value, option=option)
            _check_size(name, value, option)
        elif name in _FLOAT_FIELDS:
            _check_seconds(option, value)
        values[name] = value
    return Config(**values)


def default_root(environ: Mapping[str, str] | None = None) -> Path:
    """``$RESUMER_ROOT``, else ``$XDG_DATA_HOME/resumer``, else ``~/.local/share/resumer``."""
    env = os.environ if environ is None else environ
    if env.get("RESUMER_ROOT"):
        return Path(env["RESUMER_ROOT"])
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]) / "resumer"
    return Path.home() / ".local" / "share" / "resumer"
