"""The ``resumer`` command: argument parsing → Engine; errors → exit codes.

Exit codes: 0 done; 1 failed (budget exhausted, permanent server error); 2 usage or
config error; 130 interrupted, partials kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import config as cfgmod
from . import progress as P
from .config import Config
from .errors import ResumerError, UsageError
from .events import Event, Stats, ignore

if TYPE_CHECKING:
    from .engine import Engine
    from .serve.control import DaemonClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 2, like argparse, no traceback
        self.print_usage(sys.stderr)
        _usage_exit(message)


def _usage_exit(message: str) -> Any:
    sys.stderr.write(f"resumer: error: {message}\n")
    raise SystemExit(EXIT_USAGE)


def _common(p: argparse.ArgumentParser, *, transfer: bool = True) -> None:
    p.add_argument(
        "--root",
        type=Path,
        help="state directory (default: $RESUMER_ROOT, "
        "else $XDG_DATA_HOME/resumer, else ~/.local/share/resumer)",
    )
    p.add_argument("--config", type=Path, help="JSON config file with dockerd's key names")
    p.add_argument("--progress", choices=["auto", "tty", "plain", "json", "none"])
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    if transfer:
        p.add_argument("--max-download-attempts", type=int, metavar="N")
        p.add_argument("--max-concurrent-downloads", type=int, metavar="N")
        p.add_argument(
            "--max-connections-per-blob",
            type=int,
            metavar="K",
            help="connections per blob, each a Range of its holes (default 4; 1 is one stream)",
        )
        p.add_argument("--retry-delay", type=float, metavar="SECONDS")
        p.add_argument("--stall-timeout", type=float, metavar="SECONDS")
        p.add_argument("--low-speed-limit", type=int, metavar="BYTES_PER_S")
        p.add_argument("--low-speed-time", type=float, metavar="SECONDS")
        p.add_argument(
            "--chunk-size",
            type=int,
            metavar="BYTES",
            help="hash and record partials in chunks of this size (default 1048576); "
            "smaller chunks cost throughput on fast links",
        )
        p.add_argument(
            "--partial-budget",
            dest="partial_budget_bytes",
            metavar="SIZE",
            help="disk the partials may use (default 16GiB, at least 64MiB); SIZE is "
            "bytes or a number with K, M, G or T, all 1024-based (16G = 16GiB)",
        )
        p.add_argument(
            "--max-download-rate",
            metavar="SIZE",
            help="bytes/s for every transfer of the process together (default 0: unlimited); "
            "K, M, G suffixes, 1024-based (2M = 2 MiB/s)",
        )
        p.add_argument(
            "--max-wire-bytes",
            metavar="SIZE",
            help="stop once this run has received this many body bytes, every partial kept; "
            "the next run continues from them (default 0: no budget); K, M, G suffixes",
        )
        p.add_argument("--no-checkpoints", action="store_true", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="resumer", description="Resumable container image pulls for bad links.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fetch", help="download one URL resumably, verified before it appears")
    f.add_argument("url")
    f.add_argument("--digest", help="expected sha256:HEX (without it: keyed by URL + ETag)")
    f.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="where the verified blob appears: a new or regular file, replaced atomically "
        "(temp file, fsync, rename); a device, FIFO, socket or directory is refused, and so "
        "is a symbolic link (pass its target path instead). '-' writes the blob to stdout "
        "once verified, with progress on stderr (./- names a file called -). FILE is a "
        "copy (a reflink where the file system can): the blob also stays in the root's "
        "store, so fetching it again moves no byte",
    )
    _common(f)

    pl = sub.add_parser("pull", help="pull an image into an OCI layout, resumably")
    pl.add_argument("image")
    pl.add_argument(
        "--dest",
        type=Path,
        metavar="OCI_DIR",
        help="OCI image layout to write (default: the root's own)",
    )
    pl.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    pl.add_argument("--registry-mirror", action="append", metavar="URL")
    pl.add_argument("--insecure-registry", action="append", metavar="HOST[:PORT]")
    pl.add_argument("-q", "--quiet", action="store_true", help="print only the reference")
    _common(pl)

    r = sub.add_parser("resume", help="continue every unfinished pull with its stored options")
    _common(r)

    s = sub.add_parser("status", help="unfinished transfers: offset/size, attempts, waste")
    s.add_argument("--json", action="store_true")
    _common(s, transfer=False)

    ls = sub.add_parser("ls", help="list the stored pulls (what resume continues), by id")
    ls.add_argument("-a", "--all", action="store_true", help="finished pulls too")
    ls.add_argument("--json", action="store_true")
    _common(ls, transfer=False)

    rm = sub.add_parser(
        "rm", help="remove stored pulls by id or reference; their partials stay (budget gc)"
    )
    rm.add_argument("pulls", nargs="+", metavar="PULL", help="an id from `resumer ls`, or IMAGE")
    _common(rm, transfer=False)

    pr = sub.add_parser(
        "prune",
        help="delete the partials kept aside for lack of a record, and the stored blobs "
        "that no image in the root and no stored pull needs (what fetch alone brought in)",
    )
    _common(pr, transfer=False)

    rs = sub.add_parser(
        "reset-state",
        help="move an unusable state.db aside and start afresh, keeping every partial",
    )
    _common(rs, transfer=False)

    sv = sub.add_parser(
        "serve", help="run as the gateway's registry mirror: every engine's pull resumable"
    )
    sv.add_argument(
        "--listen",
        default="127.0.0.1:5000",
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:5000; port 0 picks a free one); "
        "anything but loopback is logged as a warning",
    )
    sv.add_argument(
        "--upstream",
        default="docker.io",
        metavar="REGISTRY",
        help="registry for requests without ?ns= (dockerd and podman send none)",
    )
    sv.add_argument("--registry-mirror", action="append", metavar="URL")
    sv.add_argument("--insecure-registry", action="append", metavar="HOST[:PORT]")
    sv.add_argument(
        "--max-clients",
        type=_positive_int,
        default=128,
        metavar="N",
        help="requests served at once; more wait briefly, then get 429 (default 128)",
    )
    sv.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=15.0,
        metavar="SECONDS",
        help="drop a client that takes longer to send its request, or idles (default 15)",
    )
    sv.add_argument(
        "--allow-upstream",
        action="append",
        metavar="REGISTRY",
        help="a registry clients may name with ?ns= (repeatable; --upstream is always "
        "allowed); without it any: give it when the mirror listens beyond loopback",
    )
    _common(sv)

    _add_demo_parser(sub)
    return parser


def _number(
    convert: Callable[[str], Any], not_a: str, ok: Callable[[Any], bool], must: str
) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, then refuse what ``ok`` does not accept,
    as "not a whole number: 'x'" or "must be at least 1, got 0" (no traceback)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {not_a}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
        return value

    return parse


def _finite_above_0(value: float) -> bool:
    return math.isfinite(value) and value > 0


_positive_int = _number(int, "a whole number", lambda v: v >= 1, "at least 1")
_positive_float = _number(float, "a number of seconds", _finite_above_0, "a finite number above 0")

#: the demo builds its image on disk: a bigger one is a typo, not a demonstration
DEMO_MAX_SIZE_MIB = 4096

_demo_size = _number(
    int,
    "a whole number of MiB",
    lambda v: 1 <= v <= DEMO_MAX_SIZE_MIB,
    f"between 1 and {DEMO_MAX_SIZE_MIB} MiB",
)
_demo_rate = _number(float, "a number of Mbit/s", _finite_above_0, "a finite rate above 0 Mbit/s")
_demo_fraction = _number(
    float,
    "a fraction",
    lambda v: 0 < v < 1,  # also refuses nan
    "a fraction of the layers strictly between 0 and 1 (e.g. 0.5)",
)


def _add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="offline demonstration on a local lossy link")
    p.add_argument(
        "--size-mib",
        type=_demo_size,
        default=48,
        help=f"image size, 1 to {DEMO_MAX_SIZE_MIB} (default 48)",
    )
    p.add_argument("--rate-mbps", type=_demo_rate, default=200.0, help="link rate, Mbit/s")
    p.add_argument("--seed", type=int, default=7, help="seed of the image and the cuts")
    p.add_argument(
        "--workdir",
        type=Path,
        help="keep files here instead of a temp dir: a new or empty directory, or one an "
        "earlier demo made (its image, registry and root are replaced)",
    )
    p.add_argument("--progress", choices=["auto", "tty", "plain", "json", "none"])
    p.add_argument(
        "--kill-at",
        type=_demo_fraction,
        default=0.5,
        help="SIGKILL the pull at this fraction of the layers, between 0 and 1 (0.5)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip measuring the from-zero client")
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")


async def _demo(args: argparse.Namespace, config: Config) -> int:
    # Imported here: the demo pulls in the lab (aiohttp's server side), which no other
    # command needs at start-up.
    from .demo import run

    return await run(args, config)


_HANDLERS: dict[str, Callable[[argparse.Namespace, Config], Awaitable[int]]] = {}


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {
        k: getattr(args, k, None)
        for k in (
            "max_download_attempts",
            "max_concurrent_downloads",
            "max_connections_per_blob",
            "retry_delay",
            "stall_timeout",
            "low_speed_limit",
            "low_speed_time",
            "chunk_size",
            "partial_budget_bytes",
            "max_download_rate",
            "max_wire_bytes",
            "progress",
            "platform",
        )
    }
    if getattr(args, "no_checkpoints", False):
        flags["checkpoints"] = False
    mirrors = getattr(args, "registry_mirror", None)
    if mirrors:
        flags["registry_mirrors"] = tuple(mirrors)
    insecure = getattr(args, "insecure_registry", None)
    if insecure:
        flags["insecure_registries"] = tuple(insecure)
    return cfgmod.build(flags, config_file=args.config)


def root_of(args: argparse.Namespace) -> Path:
    return args.root if args.root is not None else cfgmod.default_root()


async def _fetch(args: argparse.Namespace, config: Config) -> int:
    from .digest import Digest
    from .engine import Engine, check_output
    from .source import check_url

    global _stdout_is_data
    to_stdout = args.output == "-"
    if to_stdout and sys.stdout is None:
        raise UsageError("-o -: stdout is closed; give a file name")
    # Everything that can be refused is refused before the root is opened (or waited
    # for) and before a byte moves; Engine.fetch checks the same again.
    check_url(args.url)
    if args.digest is not None:
        Digest.parse(args.digest)
    out = None if to_stdout else Path(args.output)
    if out is not None:
        check_output(out)
    # With -o -, stdout carries the blob and nothing else: progress goes to stderr.
    _stdout_is_data = to_stdout
    render = P.renderer(config.progress, sys.stderr if to_stdout else sys.stdout)
    _announce_limits(render, config)
    async with Engine.open(root_of(args), config, on_wait=_say) as engine:
        result = await engine.fetch(
            args.url,
            digest=args.digest,
            dest=out,
            stream=sys.stdout.buffer if to_stdout else None,
            on_progress=render or ignore,
        )
    if render is not None:
        render(Event("", f"Digest: {result.digest}"))
        render.stats(result.stats)
    return EXIT_OK


@contextlib.asynccontextmanager
async def _engine_or_daemon(
    args: argparse.Namespace, config: Config
) -> AsyncIterator[Engine | DaemonClient]:
    """The daemon (``resumer serve``) that holds the root, if one answers on its control
    socket; else the root itself, waited for as ever while another process holds it (a
    daemon that starts meanwhile is used as soon as it answers)."""
    from .engine import Engine
    from .serve.control import DaemonClient, wait_for_root

    global _served_by
    root = root_of(args)
    daemon = await DaemonClient.find(root, _say) or await wait_for_root(root, _say, _say)
    if daemon is not None:
        logging.getLogger(__name__).info("%s: served by the daemon, pid %d", root, daemon.pid)
        daemon.config = config
        _served_by = daemon
        try:
            yield daemon
        finally:
            daemon.close()
        return
    async with Engine.open(root, config, on_wait=_say) as engine:
        yield engine


async def _pull(args: argparse.Namespace, config: Config) -> int:
    render = None if args.quiet else P.renderer(config.progress, sys.stdout)
    _announce_limits(render, config)
    async with _engine_or_daemon(args, config) as engine:
        outcome = await engine.pull(
            args.image, dest=args.dest, platform=args.platform, on_progress=render or ignore
        )
    if args.quiet:
        sys.stdout.write(outcome.reference + "\n")
    elif render is not None:
        render(Event("", f"Status: {outcome.status}"))
        if not isinstance(render, P.JsonRenderer):
            sys.stdout.write(outcome.reference + "\n")
        render.stats(outcome.stats)
    return EXIT_OK


async def _resume(args: argparse.Namespace, config: Config) -> int:
    render = P.renderer(config.progress, sys.stdout)
    _announce_limits(render, config)
    async with _engine_or_daemon(args, config) as engine:
        result = await engine.resume(on_progress=render or ignore)
    total = Stats()
    for outcome in result.outcomes:
        total.add(outcome.stats)
        if render is not None:
            render(Event("", f"Status: {outcome.status}"))
    for failure in result.failures:
        _emit_error(config, f"pull {failure.pull_id} of {failure.reference}: {failure.error}")
    if render is not None:
        if not result.outcomes and not result.failures:
            render(Event("", "Status: nothing to resume"))
        render.stats(total)
    if result.failures:
        done = len(result.outcomes)
        _say(
            f"{len(result.failures)} of {done + len(result.failures)} stored pulls failed;"
            " `resumer ls` lists them, `resumer rm PULL` drops one"
        )
        return EXIT_FAILED
    return EXIT_OK


async def _status(args: argparse.Namespace, config: Config) -> int:
    from .serve.control import DaemonClient
    from .status import collect, render_text

    # status never waits for the lock: without a daemon it reads the root as it is
    root = root_of(args)
    daemon = await DaemonClient.find(root, _say)
    if daemon is not None:
        daemon.config = config
        report = await daemon.status()
        report["root"] = str(root)  # as this user named it, as without the daemon
    else:
        report = await collect(root, config)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(render_text(report))
    return EXIT_OK


async def _ls(args: argparse.Namespace, config: Config) -> int:
    from .status import list_pulls, render_pulls

    pulls = await list_pulls(root_of(args), finished=args.all)
    if args.json:
        sys.stdout.write(json.dumps(pulls, indent=2) + "\n")
    else:
        sys.stdout.write(render_pulls(pulls))
    return EXIT_OK


async def _rm(args: argparse.Namespace, config: Config) -> int:
    from .engine import Engine
    from .pulls import Pulls
    from .serve.control import DaemonClient, wait_for_root

    root = root_of(args)
    # While `resumer serve` holds the root, it removes them (and stops retrying them).
    daemon = await DaemonClient.find(root, _say) or await wait_for_root(root, _say, _say)
    if daemon is not None:
        daemon.config = config
        got = await daemon.rm(list(args.pulls))
        if got["missing"]:
            raise UsageError(
                f"no stored pull {', '.join(got['missing'])} in {root} (see `resumer ls -a`)"
            )
        for pull_id, reference in got["removed"]:
            sys.stdout.write(f"Removed pull {pull_id} {reference}\n")
        return EXIT_OK
    async with Engine.open(root, config, on_wait=_say) as engine:
        pulls = Pulls(engine.store)
        found = {which: await pulls.find(which) for which in args.pulls}
        missing = [which for which, hits in found.items() if not hits]
        if missing:
            raise UsageError(
                f"no stored pull {', '.join(missing)} in {engine.root} (see `resumer ls -a`)"
            )
        for hits in found.values():
            for pull in hits:
                await pulls.remove(pull.id)
                sys.stdout.write(f"Removed pull {pull.id} {pull.reference}\n")
    return EXIT_OK


async def _prune(args: argparse.Namespace, config: Config) -> int:
    from .engine import Engine
    from .gc import prune_blobs, prune_orphans
    from .progress import format_bytes

    started = time.time()  # a blob changed since is in use: prune_blobs keeps it
    async with Engine.open(root_of(args), config, on_wait=_say) as engine:
        removed = await prune_orphans(engine.ingest)
        removed += await prune_blobs(engine.ingest, before=started)
    for name, size in removed:
        sys.stdout.write(f"Deleted {name} ({format_bytes(size)})\n")
    total = sum(size for _, size in removed)
    sys.stdout.write(f"Total reclaimed space: {format_bytes(total)}\n")
    return EXIT_OK


async def _reset_state(args: argparse.Namespace, config: Config) -> int:
    from .rootlock import RootLock
    from .store import move_aside

    root = root_of(args)
    lock = RootLock(root)
    await lock.acquire(on_wait=_say)
    try:
        moved = await asyncio.to_thread(move_aside, root / "state.db")
    finally:
        lock.release()
    if moved is None:
        sys.stdout.write(f"{root / 'state.db'}: nothing to move aside\n")
    else:
        sys.stdout.write(
            f"Moved {root / 'state.db'} aside to {moved}; the next command starts a fresh one"
            " and keeps every partial download (adopted again when the same blob is fetched)\n"
        )
    return EXIT_OK


async def _serve(args: argparse.Namespace, config: Config) -> int:
    from .serve.daemon import Listen, serve
    from .serve.mirror import MirrorSettings

    listen = Listen.parse(args.listen)
    # A daemon says what it does: its own lines at INFO even without -v.
    logging.getLogger("resumer.serve").setLevel(logging.INFO)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def ready(where: str) -> None:
        # Serving: SIGTERM and SIGINT now drain (every pull checkpointed, exit 0)
        # instead of cancelling the start-up.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # One line on stdout, flushed: a supervisor (or a test) reads the address from it.
        sys.stdout.write(f"Serving on http://{where}\n")
        sys.stdout.flush()

    await serve(
        root_of(args),
        config,
        listen,
        MirrorSettings(
            upstream=args.upstream,
            max_clients=args.max_clients,
            header_timeout=args.header_timeout,
            allowed_upstreams=tuple(args.allow_upstream or ()),
        ),
        on_ready=ready,
        on_wait=_say,
        stop=stop,
    )
    return EXIT_OK


_HANDLERS.update(
    {
        "fetch": _fetch,
        "pull": _pull,
        "resume": _resume,
        "status": _status,
        "ls": _ls,
        "rm": _rm,
        "prune": _prune,
        "reset-state": _reset_state,
        "demo": _demo,
        "serve": _serve,
    }
)


def _announce_limits(render: P.Renderer | None, config: Config) -> None:
    """One line per limit in force, before the first byte: "Rate limit: 2 MiB/s"."""
    from .rate import limits_text

    if render is not None:
        for line in limits_text(config.max_download_rate, config.max_wire_bytes):
            render(Event("", line))


def _say(message: str) -> None:
    sys.stderr.write(f"resumer: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
    except ResumerError as exc:
        _say(str(exc))
        return EXIT_USAGE
    _tune_process()
    try:
        return asyncio.run(_run(args, config))
    except KeyboardInterrupt:
        if _served_by is not None:
            # Like docker pull's Ctrl-C: only this view of the pull stops.
            _say(
                f"interrupted; the daemon serving {_served_by.root} (pid {_served_by.pid})"
                " goes on with it: `resumer status` shows how far it got"
            )
        else:
            _say("interrupted; partial downloads are kept, run the same command again to resume")
        return EXIT_INTERRUPTED
    except ResumerError as exc:
        _emit_error(config, str(exc))
        return exc.exit_code


async def _run(args: argparse.Namespace, config: Config) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    # SIGTERM and SIGINT cancel the run: the partials get their last checkpoint.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await _HANDLERS[args.command](args, config)
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


def _tune_process() -> None:
    """Process-wide tuning for the command line only (a library leaves its host alone).

    Measured on a 1 GiB fetch from nginx on loopback (benchmarks/results/fetch.md):
    - glibc's malloc maps (and unmaps) every block ≥ 128 KiB on its own and trims the
      heap eagerly, so big buffers cost fresh page faults each time; a fixed 4 MiB mmap
      threshold and a 64 MiB trim threshold keep them in the warm heap.
    - Everything imported so far lives as long as the process: gc.freeze() takes it out
      of every later collection.
    """
    if sys.platform.startswith("linux"):
        # The running process's own symbols include libc's (find_library would spawn
        # ldconfig); a libc without mallopt (musl) is left as it is.
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            pass
        else:
            m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
            mallopt(m_mmap_threshold, 4 << 20)
            mallopt(m_trim_threshold, 64 << 20)
    gc.freeze()


#: set by ``fetch -o -``: stdout carries the blob, so JSON errors go to stderr
_stdout_is_data = False
#: the daemon this command talks to, if a ``resumer serve`` holds the root
_served_by: DaemonClient | None = None


def _emit_error(config: Config, message: str) -> None:
    if config.progress == "json":
        out = sys.stderr if _stdout_is_data else sys.stdout
        out.write(json.dumps({"error": message, "errorDetail": {"message": message}}) + "\n")
        out.flush()
    _say(message)


if __name__ == "__main__":
    raise SystemExit(main())
