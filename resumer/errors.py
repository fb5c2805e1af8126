"""Every error resumer raises, in one tree.

    ResumerError                     base; ``retryable``, per class: may another attempt help?
    ├── UsageError                   bad flags, config file or reference (exit 2)
    │   ├── ConfigError
    │   ├── ReferenceError_          an image reference that does not parse
    │   ├── UrlError                 a URL fetch cannot use: not http(s), or malformed
    │   └── OutputError              an output path that must not be written (device, link …)
    ├── StoreError                   the state database or the root directory
    │   ├── DiskFullError            ENOSPC/EDQUOT: names the path; partials are kept
    │   ├── CorruptStateError        state.db unusable: names the file and reset-state
    │   ├── SchemaTooNewError        state.db written by a newer resumer
    │   ├── RootLockedError          another process holds the root
    │   ├── RootUnusableError        the root is not a writable directory (exit 2)
    │   └── PublishError             a verified blob could not reach its output; kept in store
    ├── TransferError                one blob transfer
    │   ├── TransientError           retryable: cut, stall, 5xx, 408, 429, bad Content-Range …
    │   │   ├── ConnectionCutError
    │   │   │   └── ConnectFailedError   no response at all: refused, unreachable, reset early
    │   │   ├── StallError
    │   │   ├── ServerError          408 / 429 / 5xx, may carry Retry-After
    │   │   ├── BrokenServerError    206 with a wrong Content-Range, an over-long body …
    │   │   ├── RangeRestartError    416 below the expected size: partial discarded
    │   │   └── PartialDiscardedError  a reader of a growing partial whose bytes were thrown away
    │   ├── PermanentError           never retried
    │   │   ├── NotFoundError        404
    │   │   ├── UntrustedCertificateError  TLS certificate verification failed
    │   │   ├── AccessDeniedError    401/403 that persists after one token refresh
    │   │   │   └── ForbiddenError   403 on a request: the caller refreshes once, as for 401
    │   │   └── DigestMismatchError  never retried as such; after a resume, a restart from zero
    │   ├── UnauthorizedError        401: refresh the token once, not an attempt
    │   ├── BudgetExhaustedError     max-download-attempts used up; names blob, N, last cause
    │   ├── WireBudgetExhaustedError the run's max-wire-bytes spent; partials kept, not retried
    │   └── LayerDownloadError       a pull's layer failed; names its position and the cause
    ├── RegistryError                the distribution API answered something unusable
    │   └── PlatformNotFoundError
    ├── RegistrationError            decompression, diffID mismatch, decompression bomb
    └── LinkLabError                 the lab cannot run here (no root, no /dev/net/tun)

Lower-layer exceptions (aiohttp, OSError, sqlite3) are mapped into this tree where
those layers end, with ``raise … from exc``, so callers never see a foreign traceback.
"""

from __future__ import annotations

from typing import ClassVar


class ResumerError(Exception):
    """Base of every error resumer raises on purpose."""

    #: Whether another attempt may help: a property of the class, never of one instance,
    #: so one look at the tree says what is retried. The attempt policy (retry.py) makes
    #: the few decisions that depend on more than the class (a refresh, a restart).
    retryable: ClassVar[bool] = False
    exit_code: int = 1


class UsageError(ResumerError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class ConfigError(UsageError):
    """A flag, environment variable or config-file value is invalid."""


class ReferenceError_(UsageError):
    """An image reference that does not parse."""


class UrlError(UsageError):
    """A URL that ``fetch`` cannot use: a scheme other than http(s), or malformed."""


class OutputError(UsageError):
    """An output path resumer must not write: a device, FIFO, socket, link or directory,
    or one in a directory it cannot create files in."""


class StoreError(ResumerError):
    """The state database or root directory cannot be used."""


class DiskFullError(StoreError):
    """ENOSPC or EDQUOT (or SQLite's "database or disk is full"): names the path. Every
    partial is kept; a later run continues once space is freed."""


class CorruptStateError(StoreError):
    """state.db is not a database SQLite can use; the message names the command that
    moves it aside (``resumer reset-state``), which keeps every partial."""


class SchemaTooNewError(StoreError):
    """state.db was written by a newer resumer than this one."""


class RootLockedError(StoreError):
    """Another resumer process holds the root."""


class RootUnusableError(StoreError):
    """The root is not a directory resumer can write (read-only, not writable, a file):
    a configuration problem, so a usage error."""

    exit_code = 2


class PublishError(StoreError):
    """A verified blob could not be made visible at its output path; it stays in the store."""


class TransferError(ResumerError):
    """One attempt, or one whole transfer, failed."""

    #: HTTP status of the response that caused the error, when there was one.
    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class TransientError(TransferError):
    """Another attempt may succeed."""

    retryable = True

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class ConnectionCutError(TransientError):
    """The connection failed or closed before the body was complete."""


class ConnectFailedError(ConnectionCutError):
    """No response at all: refused, unreachable, DNS, or closed before the status line.

    The host's health record (hosts.py) tries such a host after the others for a while.
    """


class StallError(TransientError):
    """No byte for stall-timeout, or below low-speed-limit for low-speed-time."""


class ServerError(TransientError):
    """408, 429 or 5xx."""


class BrokenServerError(TransientError):
    """The server broke the Range contract (wrong Content-Range, over-long body)."""


class RangeRestartError(TransientError):
    """416 for an offset below the expected size: the partial was discarded."""


class PartialDiscardedError(TransientError):
    """A reader of a growing partial: the bytes it read were thrown away (a reset)."""


class PermanentError(TransferError):
    """Retrying cannot help."""


class NotFoundError(PermanentError):
    """404: unknown blob, manifest or URL."""


class UntrustedCertificateError(PermanentError):
    """The server's TLS certificate does not verify: another attempt meets the same one."""


class AccessDeniedError(PermanentError):
    """401 or 403 that persisted after one token refresh."""


class ForbiddenError(AccessDeniedError):
    """403 on a request. Like a 401, it may mean a token of too narrow a scope, so the
    attempt policy refreshes once (not an attempt); raised as is, it is permanent."""

    def __init__(self, message: str, *, challenge: str | None = None) -> None:
        super().__init__(message, status=403)
        self.challenge = challenge


class DigestMismatchError(PermanentError):
    """The downloaded content does not hash to the expected digest.

    ``resumed`` records whether the download had been resumed: a fact, not a decision.
    Docker's rule, a mismatch after a resume is retried from zero, is the attempt
    policy's (``retry.AttemptPolicy`` answers RESTART); the class itself is never retried.
    """

    def __init__(self, message: str, *, resumed: bool) -> None:
        super().__init__(message)
        self.resumed = resumed


class UnauthorizedError(TransferError):
    """401: the caller refreshes the token once; this does not count as an attempt."""

    def __init__(self, message: str, *, challenge: str | None) -> None:
        super().__init__(message, status=401)
        self.challenge = challenge


class BudgetExhaustedError(TransferError):
    """Every attempt of max-download-attempts failed."""

    def __init__(self, blob: str, attempts: int, last: BaseException) -> None:
        super().__init__(f"{blob}: gave up after {attempts} attempt(s); last error: {last}")
        self.blob = blob
        self.attempts = attempts
        self.last = last


class WireBudgetExhaustedError(TransferError):
    """The run's wire-byte budget (``max-wire-bytes``) is spent: every transfer stops
    cleanly, keeping its partial, and the next run continues from them. Never retried in
    this run (another attempt would spend more); not a failure for good either."""

    def __init__(self, budget: int, used: int) -> None:
        super().__init__(
            f"wire-byte budget spent: {used} bytes received by this run, budget {budget} "
            f"bytes (--max-wire-bytes); every partial download is kept: run the same "
            f"command again (or `resumer resume`) to continue from them"
        )
        self.budget = budget
        self.used = used


class LayerDownloadError(TransferError):
    """A layer's transfer failed (budget exhausted, 404 …); ``cause`` is the transfer's error.

    ``position`` is the lowest layer of the stack with that digest; it and every layer
    above it failed with this error.
    """

    def __init__(self, position: int, digest: str, cause: BaseException) -> None:
        text = str(cause)
        where = f"layer {position}" if digest in text else f"layer {position} {digest}"
        super().__init__(f"{where}: {text}", status=getattr(cause, "status", None))
        self.position = position
        self.digest = digest
        self.cause = cause
        self.exit_code = getattr(cause, "exit_code", 1)


class RegistryError(ResumerError):
    """The registry answered something resumer cannot use."""


class PlatformNotFoundError(RegistryError):
    """No manifest in the index matches the requested platform."""


class RegistrationError(ResumerError):
    """A committed layer could not be registered (bad compression, diffID mismatch)."""


class LinkLabError(ResumerError):
    """The lab cannot run here; the message says why."""


def disk_error(doing: str, exc: OSError) -> StoreError:
    """An OSError from our own disk, as the error to raise: ``doing`` names the step and
    the path ("cannot write partial /r/ingest/x"). A full disk or quota says so plainly,
    so ``status`` and the operator see "disk full", not an errno."""
    import errno  # local: this module imports nothing else

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"disk full: {doing}: free space on that file system and run the same command"
            " again (every partial download is kept)"
        )
    return StoreError(f"{doing}: {exc.strerror or exc}")
