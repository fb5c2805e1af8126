"""The one frozen Config, shared by the library, the CLI flags and the config file.

Precedence: flag, then environment (``RESUMER_<KEY>``), then the JSON config file
(dockerd's key names), then the default.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

MiB = 1 << 20


@dataclass(frozen=True)
class Config:
    """Every tunable of resumer. Invalid values are refused at construction."""

    max_download_attempts: int = 5
    max_concurrent_downloads: int = 3
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
        for name in ("retry_delay", "stall_timeout", "low_speed_time", "connect_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')} must not be negative")
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
    "registry-mirrors": "registry_mirrors",
    "insecure-registries": "insecure_registries",
    "retry-delay": "retry_delay",
    "stall-timeout": "stall_timeout",
    "low-speed-limit": "low_speed_limit",
    "low-speed-time": "low_speed_time",
    "chunk-size": "chunk_size",
    "partial-budget-bytes": "partial_budget_bytes",
    "platform": "platform",
    "progress": "progress",
}
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
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
    except (TypeError, ValueError) as exc:
        flag = name.replace("_", "-")
        raise ConfigError(f"{source}: invalid value {value!r} for {flag}") from exc


def load_file(path: Path) -> dict[str, Any]:
    """Read a dockerd-style JSON config file into Config field values."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path}: not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
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
    """Merge default < file < environment < flags (flags set to None are absent)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_file(config_file))
    values.update(load_env(os.environ if environ is None else environ))
    values.update({k: v for k, v in flags.items() if v is not None})
    return Config(**values)


def default_root(environ: Mapping[str, str] | None = None) -> Path:
    """``$RESUMER_ROOT``, else ``$XDG_DATA_HOME/resumer``, else ``~/.local/share/resumer``."""
    env = os.environ if environ is None else environ
    if env.get("RESUMER_ROOT"):
        return Path(env["RESUMER_ROOT"])
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]) / "resumer"
    return Path.home() / ".local" / "share" / "resumer"
