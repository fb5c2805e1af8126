"""The daemon's control socket, ``ROOT/serve.sock``: how ``resumer pull``, ``resume``,
``status`` and ``rm`` reach a ``resumer serve`` that holds the root.

The protocol is JSON lines, one request per connection:

- request (client → daemon), one line of at most ``MAX_REQUEST`` bytes::

    {"command": "pull", "args": {"image": "…", "dest": "/abs" | null, "platform": …},
     "config": {"max_download_attempts": 2, …}}

  ``command`` is ``pull``, ``resume``, ``status`` or ``rm`` (args ``{"pulls": […]}``);
  ``config`` holds the client's settings that differ from the defaults, as Config keys.
  The registry options (mirrors, insecure registries, platform) are the pull's own and
  are stored with it; every other setting is the daemon's (one transfer manager, one
  rate cap for every pull on the root), and one the client set differently is named in
  a ``say`` line.
- responses (daemon → client): ``{"event": {…}}`` per progress event, in order;
  ``{"say": "…"}`` for a line the CLI writes to stderr; then one final
  ``{"done": {"exit": N, "error": "…" | null, "result": {…} | null}}``.

Bad input (not JSON, not an object, an unknown command, a line too long, no line within
``REQUEST_TIMEOUT``) gets a final line with exit 2 and what was wrong, never a traceback;
the daemon keeps serving.

A client that leaves (Ctrl-C) leaves only its view: the pull goes on in the daemon, as
``docker pull``'s Ctrl-C leaves dockerd's pull running. A pull that fails for this run
is taken on by the supervisor and run again after its back-off.

The socket file is created under a temporary name, set to 0600, and renamed into place,
so a client never finds one it cannot use or one that is not listening yet. A file left
by a daemon that was killed refuses connections: the next daemon, which holds the root
lock, replaces it. Unix socket paths are limited to 107 bytes; a longer one is reached
through ``/proc/self/fd`` of the root directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import Config
from ..engine import Engine, ResumeFailure, ResumeResult
from ..errors import ResumerError, UsageError
from ..events import Event, ProgressCallback, Stats, Status, ignore
from ..pull import STORED_OPTIONS, PullOutcome, config_with
from ..pulls import Pulls
from ..rootlock import POLL_MAX, RootLock
from ..status import collect, lock_holder
from .supervisor import Supervisor

log = logging.getLogger(__name__)

SOCKET_NAME = "serve.sock"
#: the longest request line: a request is a command and a few options
MAX_REQUEST = 64 * 1024
#: the longest response line a client reads (a status report of many transfers)
MAX_RESPONSE = 64 * 1024 * 1024
#: how long a connection may take to send its request line
REQUEST_TIMEOUT = 30.0
#: a client that stops reading gets no more progress beyond this much unsent output
#: (its final line still comes): the daemon's memory does not grow with a stuck client
MAX_UNSENT = 4 * 1024 * 1024
#: the exit code of a request the daemon's stop cut short (the CLI's "interrupted")
EXIT_INTERRUPTED = 130
COMMANDS = ("pull", "resume", "status", "rm")
#: settings only the client uses (it draws the progress itself)
_CLIENT_ONLY = frozenset({"progress"})
_FIELDS = {f.name for f in dataclasses.fields(Config)}


def socket_path(root: Path) -> Path:
    return root / SOCKET_NAME


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits a unix socket address (107 bytes)."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class BadRequest(UsageError):
    """A control request that cannot be understood."""


# --- encoding ------------------------------------------------------------------------


def _event_json(event: Event) -> dict[str, Any]:
    d = dataclasses.asdict(event)
    d["status"] = str(event.status)
    return d


def _event(d: dict[str, Any]) -> Event:
    status = d["status"]
    with contextlib.suppress(ValueError):
        status = Status(status)
    return Event(d["id"], status, d.get("current"), d.get("total"), d.get("value"), d.get("error"))


def _stats_json(stats: Stats) -> dict[str, Any]:
    return dataclasses.asdict(stats)


def _stats(d: dict[str, Any]) -> Stats:
    return Stats(**d)


def _outcome_json(o: PullOutcome) -> dict[str, Any]:
    return {
        "reference": o.reference,
        "digest": o.digest,
        "up_to_date": o.up_to_date,
        "stats": _stats_json(o.stats),
        "pull_id": o.pull_id,
    }


def _outcome(d: dict[str, Any]) -> PullOutcome:
    return PullOutcome(
        d["reference"], d["digest"], d["up_to_date"], _stats(d["stats"]), d["pull_id"]
    )


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class RemoteError(ResumerError):
    """An error the daemon answered with: its message and exit code, as they were."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- the server ----------------------------------------------------------------------


class _Conn:
    """One client connection: events go out as they come, until the client leaves."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.gone = False
        self.lagging = False

    def send(self, obj: dict[str, Any], *, progress: bool = False) -> None:
        if self.gone or self.writer.is_closing():
            self.gone = True
            return
        if progress and self.writer.transport.get_write_buffer_size() > MAX_UNSENT:
            if not self.lagging:
                log.warning("control: a client is not reading: its progress is dropped")
                self.lagging = True
            return
        self.writer.write(_line(obj))

    def emit(self, event: Event) -> None:
        self.send({"event": _event_json(event)}, progress=True)

    def say(self, text: str) -> None:
        self.send({"say": text})

    async def finish(self, code: int, error: str | None, result: Any = None) -> None:
        self.send({"done": {"exit": code, "error": error, "result": result}})
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()

    async def until_gone(self) -> None:
        """Returns when the client closes its end (it sends nothing after its request)."""
        with contextlib.suppress(ConnectionError, OSError):
            while await self.reader.read(4096):
                pass
        self.gone = True


class ControlServer:
    """Serves the control socket of ``engine``'s root; pulls run in ``supervisor``."""

    def __init__(self, engine: Engine, supervisor: Supervisor) -> None:
        self.engine = engine
        self.supervisor = supervisor
        self.path = socket_path(engine.root)
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, sock=sock, limit=MAX_REQUEST
            )
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("control: listening on %s", self.path)

    def _bind(self) -> socket.socket:
        """Bind a temporary name, 0600, listen, then rename it over ``serve.sock``."""
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                # We hold the root lock, so no daemon can be serving this root.
                raise UsageError(
                    f"{self.path}: another process answers on it; remove it if it is not"
                    " a resumer daemon of this root"
                )
            log.info("control: replacing %s, left by a daemon that ended", self.path)
        tmp = self.path.with_name(f".{SOCKET_NAME}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _addressable(tmp) as name:
                sock.bind(name)
            os.chmod(tmp, 0o600)  # before it has its name: no client finds it wider
            sock.listen(64)
            sock.setblocking(False)
            os.replace(tmp, self.path)
            st = self.path.stat()
            self._inode = (st.st_dev, st.st_ino)
        except OSError as exc:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise UsageError(f"serve: cannot create {self.path}: {exc.strerror or exc}") from exc
        return sock

    def stop_accepting(self) -> None:
        """Close the listening socket and remove its file: new clients wait for the lock."""
        if self._server is not None:
            self._server.close()
        self._unlink()

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            st = self.path.stat()
            if (st.st_dev, st.st_ino) == self._inode:  # ours, not a newer daemon's
                self.path.unlink()
        self._inode = None

    async def close(self, timeout: float = 10.0) -> None:
        """After ``stop_accepting`` and the supervisor's close: let every handler send its
        final line, then drop the connections still open."""
        self.stop_accepting()
        handlers = [t for t in self._handlers if not t.done()]
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = _Conn(reader, writer)
        try:
            await self._serve_one(conn)
        except asyncio.CancelledError:
            await conn.finish(EXIT_INTERRUPTED, "interrupted: the daemon is stopping")
            raise
        except Exception:  # a bug: the client gets a line, the daemon a traceback
            log.exception("control: request failed")
            await conn.finish(1, "internal error in the daemon; its log has the details")
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_one(self, conn: _Conn) -> None:
        try:
            request = await self._read_request(conn.reader)
            if request is _SILENT:
                return
            command, args, overrides = _parse(request)
        except BadRequest as exc:
            log.warning("control: bad request: %s", exc)
            await conn.finish(exc.exit_code, str(exc))
            return
        log.info("control: %s %s", command, _brief(args))
        try:
            config = self._config(overrides, conn, command)
            result = await getattr(self, f"_do_{command}")(conn, args, config)
        except ResumerError as exc:
            await conn.finish(exc.exit_code, str(exc))
            return
        except _Interrupted as exc:
            await conn.finish(EXIT_INTERRUPTED, str(exc))
            return
        except _ClientGone:
            return
        await conn.finish(0, None, result)

    async def _read_request(self, reader: asyncio.StreamReader) -> Any:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                raw = await reader.readline()
        except TimeoutError:
            raise BadRequest(f"control request: none within {REQUEST_TIMEOUT:g} s") from None
        except ValueError:  # StreamReader's limit: the line is longer than MAX_REQUEST
            raise BadRequest(f"control request: a line longer than {MAX_REQUEST} bytes") from None
        except (ConnectionError, OSError) as exc:
            raise BadRequest(f"control request: connection lost: {exc}") from None
        if not raw:
            return _SILENT  # connected and left without a word (a probe)
        if not raw.endswith(b"\n"):
            raise BadRequest("control request: the connection ended before a whole line")
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise BadRequest(f"control request: not UTF-8: {exc}") from None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise BadRequest(f"control request: not JSON: {exc}") from None

    def _config(self, overrides: dict[str, Any], conn: _Conn, command: str) -> Config:
        daemon = self.engine.config
        own: dict[str, Any] = {}
        for key, value in sorted(overrides.items()):
            if key not in _FIELDS:
                raise BadRequest(f"control request: unknown setting {key!r}")
            if key in _CLIENT_ONLY:
                continue
            if key in STORED_OPTIONS:
                own[key] = _check_option(key, value)
                continue
            mine = getattr(daemon, key)
            if (
                command in ("pull", "resume")
                and (tuple(value) if isinstance(value, list) else value) != mine
            ):
                conn.say(
                    f"{key.replace('_', '-')} {value}: the daemon serving {self.engine.root}"
                    f" runs every pull with its own ({mine}); stop `resumer serve` to"
                    f" {command} with yours"
                )
        return config_with(daemon, own) if own else daemon

    # --- the commands ----------------------------------------------------------------

    async def _follow(self, conn: _Conn, task: asyncio.Task[Any], what: str) -> Any:
        """The task's result, once it ends; if the client leaves first, the task goes
        on in the daemon (and we stop writing to the client)."""
        gone = asyncio.ensure_future(conn.until_gone())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        if not task.done():
            log.info("control: the client of %s left; it continues in the daemon", what)
            conn.gone = True
            raise _ClientGone  # no one to answer: the task ends in the supervisor
        if task.cancelled():
            raise _Interrupted(
                f"interrupted: the daemon serving {self.engine.root} is stopping;"
                " partial downloads are kept, run the same command again to resume"
            )
        return task.result()

    async def _do_pull(self, conn: _Conn, args: dict[str, Any], config: Config) -> Any:
        image = args.get("image")
        dest = args.get("dest")
        platform = args.get("platform")
        if not isinstance(image, str):
            raise BadRequest("control request: pull needs args.image, a string")
        if dest is not None and not (isinstance(dest, str) and os.path.isabs(dest)):
            raise BadRequest("control request: pull's args.dest must be an absolute path")
        if platform is not None and not isinstance(platform, str):
            raise BadRequest("control request: pull's args.platform must be a string")
        engine, supervisor = self.engine, self.supervisor

        async def job() -> PullOutcome:
            try:
                # The request's own registry options (mirrors, insecure registries,
                # platform) over the daemon's: they are stored with the pull.
                outcome = await engine.pull(
                    image,
                    config=config,
                    dest=Path(dest) if dest is not None else None,
                    platform=platform,
                    on_progress=conn.emit,
                )
            except ResumerError as exc:
                log.warning("control: pull %s failed: %s", image, exc)
                await supervisor.adopt_failed()  # run again after the back-off
                raise
            log.info("control: pull %s: done (%s)", image, outcome.digest)
            return outcome

        task = supervisor.spawn(job(), name=f"control: pull {image}")
        return _outcome_json(await self._follow(conn, task, f"the pull of {image}"))

    async def _do_resume(self, conn: _Conn, args: dict[str, Any], config: Config) -> Any:
        engine, supervisor = self.engine, self.supervisor

        async def job() -> ResumeResult:
            result = await engine.resume(on_progress=conn.emit)
            if result.failures:
                await supervisor.adopt_failed()
            return result

        task = supervisor.spawn(job(), name="control: resume")
        result: ResumeResult = await self._follow(conn, task, "resume")
        return {
            "outcomes": [_outcome_json(o) for o in result.outcomes],
            "failures": [
                {
                    "pull_id": f.pull_id,
                    "reference": f.reference,
                    "error": str(f.error),
                    "exit": f.error.exit_code,
                }
                for f in result.failures
            ],
        }

    async def _do_status(self, conn: _Conn, args: dict[str, Any], config: Config) -> Any:
        return await collect(self.engine.root, self.engine.config)

    async def _do_rm(self, conn: _Conn, args: dict[str, Any], config: Config) -> Any:
        which = args.get("pulls")
        if not (isinstance(which, list) and which and all(isinstance(w, str) for w in which)):
            raise BadRequest("control request: rm needs args.pulls, a list of strings")
        pulls = Pulls(self.engine.store)
        found = {w: await pulls.find(w) for w in which}
        missing = [w for w, hits in found.items() if not hits]
        if missing:
            return {"missing": missing, "removed": []}
        removed = []
        for hits in found.values():
            for pull in hits:
                await pulls.remove(pull.id)
                log.info("control: removed pull %d of %s", pull.id, pull.reference)
                removed.append([pull.id, pull.reference])
        return {"missing": [], "removed": removed}


#: what a connection that sent nothing at all "asked"
_SILENT = object()


class _Interrupted(Exception):
    """The daemon's stop cut a request short."""


class _ClientGone(Exception):
    """The client left; nothing to answer."""


def _parse(request: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    if not isinstance(request, dict):
        raise BadRequest("control request: expected a JSON object")
    command = request.get("command")
    if command not in COMMANDS:
        raise BadRequest(
            f"control request: unknown command {command!r} (one of {', '.join(COMMANDS)})"
        )
    args = request.get("args", {})
    overrides = request.get("config", {})
    if not isinstance(args, dict) or not isinstance(overrides, dict):
        raise BadRequest("control request: args and config must be JSON objects")
    return command, args, overrides


def _check_option(key: str, value: Any) -> Any:
    if key == "platform":
        if value is None or isinstance(value, str):
            return value
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BadRequest(f"control request: setting {key!r} has the wrong type")


def _brief(args: dict[str, Any]) -> str:
    return json.dumps(args)[:200]


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, _addressable(path) as name:
        try:
            s.connect(name)
        except OSError:
            return False
    return True


# --- the client ----------------------------------------------------------------------


class DaemonClient:
    """The CLI's way to a daemon that holds the root: ``pull`` and ``resume`` as the
    Engine's, ``status`` and ``rm`` as their commands need."""

    def __init__(self, root: Path, pid: int, on_say: Callable[[str], None]) -> None:
        self.root = root
        self.pid = pid
        self.on_say = on_say
        #: the client's settings: the ones that differ from the defaults go along
        self.config = Config()
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    @classmethod
    async def find(cls, root: Path, on_say: Callable[[str], None]) -> DaemonClient | None:
        """The daemon of ``root``, if one holds its lock and answers on its socket; the
        connection made to ask is the one the request goes over."""
        pid = lock_holder(root)
        if pid is None:
            return None
        path = socket_path(root)
        if not path.exists():
            return None
        try:
            with _addressable(path) as name:
                reader, writer = await asyncio.open_unix_connection(name, limit=MAX_RESPONSE)
        except OSError:  # refused (a file left by a killed daemon), gone, not ours
            return None
        client = cls(root, pid, on_say)
        client._conn = (reader, writer)
        return client

    async def _request(
        self,
        command: str,
        args: dict[str, Any],
        on_progress: ProgressCallback = ignore,
    ) -> Any:
        if self._conn is None:
            raise RuntimeError("one request per DaemonClient")
        reader, writer = self._conn
        self._conn = None
        try:
            writer.write(
                _line({"command": command, "args": args, "config": _overrides(self.config)})
            )
            await writer.drain()
            while True:
                try:
                    raw = await reader.readline()
                except (ConnectionError, OSError, ValueError) as exc:
                    raise self._gone(str(exc)) from exc
                if not raw.endswith(b"\n"):
                    raise self._gone("it closed the connection before answering")
                try:
                    msg = json.loads(raw)
                except ValueError as exc:
                    raise self._gone(f"it answered with a line that is not JSON: {exc}") from exc
                if "event" in msg:
                    on_progress(_event(msg["event"]))
                elif "say" in msg:
                    self.on_say(msg["say"])
                elif "done" in msg:
                    done = msg["done"]
                    if done["exit"] != 0:
                        raise RemoteError(done["error"], done["exit"])
                    return done["result"]
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def close(self) -> None:
        """Drop the connection if no request used it."""
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    def _gone(self, why: str) -> ResumerError:
        return RemoteError(
            f"the daemon serving {self.root} (pid {self.pid}) stopped before it answered"
            f" ({why}); partial downloads are kept: run the same command again to resume",
            1,
        )

    async def pull(
        self,
        reference: str,
        *,
        dest: Path | None = None,
        platform: str | None = None,
        on_progress: ProgressCallback = ignore,
    ) -> PullOutcome:
        args = {
            "image": reference,
            "dest": os.path.abspath(dest) if dest is not None else None,
            "platform": platform,
        }
        return _outcome(await self._request("pull", args, on_progress))

    async def resume(self, *, on_progress: ProgressCallback = ignore) -> ResumeResult:
        got = await self._request("resume", {}, on_progress)
        return ResumeResult(
            [_outcome(o) for o in got["outcomes"]],
            [
                ResumeFailure(f["pull_id"], f["reference"], RemoteError(f["error"], f["exit"]))
                for f in got["failures"]
            ],
        )

    async def status(self) -> dict[str, Any]:
        report: dict[str, Any] = await self._request("status", {})
        return report

    async def rm(self, which: list[str]) -> dict[str, Any]:
        got: dict[str, Any] = await self._request("rm", {"pulls": which})
        return got


def _overrides(config: Config) -> dict[str, Any]:
    """The client's settings that differ from the defaults, as Config keys."""
    default = Config()
    out = {}
    for f in dataclasses.fields(Config):
        value = getattr(config, f.name)
        if value != getattr(default, f.name):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


async def wait_for_root(
    root: Path, on_wait: Callable[[str], None], on_say: Callable[[str], None]
) -> DaemonClient | None:
    """While another process holds ``root``: wait until a daemon answers for it (returns
    its client) or the lock is free (returns None; the caller then takes it). A root
    without a holder returns None at once."""
    if lock_holder(root) is None:
        return None
    on_wait(f"waiting for {RootLock(root).holder()}, which is using {root}")
    pause = 0.01
    while True:
        await asyncio.sleep(pause)  # cancellable: nothing is held meanwhile
        pause = min(pause * 2, POLL_MAX)
        client = await DaemonClient.find(root, on_say)
        if client is not None:
            return client
        if lock_holder(root) is None:
            return None
