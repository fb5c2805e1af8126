"""Shared fixtures: the real registry, nginx, and images pushed into the registry.

The helpers live in ``tests/servers.py`` so benchmarks and the demo can use them without
pytest. Every fixture tears down what it started.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import inspect
import re
import sys
import types
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).parent))

from servers import (
    NGINX_BIN,
    REGISTRY_BIN,
    SKOPEO_BIN,
    Nginx,
    Registry,
    require,
    skopeo_copy,
    start_nginx,
    start_registry,
)

from resumer.lab.images import (
    BuiltImage,
    Layer,
    LayerSpec,
    build_image,
    build_multiplatform,
    write_oci_layout,
)

RegistryFactory = Callable[..., Registry]
NginxFactory = Callable[..., Nginx]
ServeApp = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve_app() -> AsyncIterator[ServeApp]:
    """``await serve_app(app) -> "http://127.0.0.1:PORT"``: the app listens until the test ends."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def registry_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryFactory]:
    """``registry_factory(extra_config=None) -> Registry``, for auth or proxy variants."""
    require(REGISTRY_BIN)
    started: list[Registry] = []

    def start(extra_config: dict[str, Any] | None = None) -> Registry:
        reg = start_registry(tmp_path_factory.mktemp("registry"), extra_config=extra_config)
        started.append(reg)
        return reg

    yield start
    for reg in started:
        reg.stop()


@pytest.fixture
def registry(registry_factory: RegistryFactory) -> Registry:
    """A fresh CNCF registry without auth on 127.0.0.1: ``.url``, ``.host``."""
    return registry_factory()


@pytest.fixture
def nginx_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxFactory]:
    """``nginx_factory(docroot, extra_server="") -> Nginx`` serving ``docroot``."""
    require(NGINX_BIN)
    started: list[Nginx] = []

    def start(docroot: Path | str, extra_server: str = "") -> Nginx:
        srv = start_nginx(docroot, tmp_path_factory.mktemp("nginx"), extra_server=extra_server)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def nginx(nginx_factory: NginxFactory, tmp_path: Path) -> Nginx:
    """nginx serving the (initially empty) directory ``nginx.docroot``."""
    docroot = tmp_path / "www"
    docroot.mkdir()
    return nginx_factory(docroot)


@dataclass
class PushedImage:
    registry: Registry
    repo: str
    tag: str
    image: BuiltImage
    layout: Path  # the OCI layout it was pushed from

    @property
    def reference(self) -> str:
        """``127.0.0.1:PORT/REPO:TAG``, as a user would type it."""
        return f"{self.registry.host}/{self.repo}:{self.tag}"

    @property
    def digest(self) -> str:
        return self.image.digest


PushImage = Callable[..., PushedImage]


@pytest.fixture
def pushed_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> PushImage:
    """``pushed_image(repo="lab/app", tag="v1", layers=..., seed=0, multiplatform=False,
    flavour="oci", image=None) -> PushedImage``: build (or take) an image and push it into
    ``registry`` with skopeo from an OCI layout."""
    require(SKOPEO_BIN)

    def push(
        repo: str = "lab/app",
        tag: str = "v1",
        layers: Sequence[LayerSpec | Layer] = (LayerSpec(), LayerSpec(compression="zstd")),
        *,
        seed: int = 0,
        multiplatform: bool = False,
        flavour: Any = "oci",
        image: BuiltImage | None = None,
    ) -> PushedImage:
        work = tmp_path_factory.mktemp("image")
        if image is None:
            build = build_multiplatform if multiplatform else build_image
            image = build(work / "build", layers, seed=seed, flavour=flavour)
        layout = write_oci_layout(work / "layout", image, tag)
        # --all keeps every platform of an index; --preserve-digests refuses any rewrite,
        # so the registry holds exactly the digests the test knows.
        skopeo_copy(
            f"oci:{layout}:{tag}",
            f"docker://{registry.host}/{repo}:{tag}",
            "--all",
            "--preserve-digests",
        )
        return PushedImage(registry, repo, tag, image, layout)

    return push


# --- the leak guard: no task, coroutine or loop outlives its test ------------------------
#
# DESIGN.md, "No task or future outlives its loop": CPython 3.11 before 3.11.8 can segfault
# at interpreter exit when it finalizes a coroutine suspended on a Future (gh-113566). So a
# leak must fail the test that made it, here, not crash the interpreter after "N passed".
# After every test:
# - the loops of processes killed by tests/crash.py are unwound and closed (the test is
#   over: their finally blocks may run now), before the fixtures are torn down;
# then, once the fixtures are torn down:
# - a task the test created that is still pending on a closed or stopped loop is a leak
#   (it can never finish); one pending on a loop that still runs (a wider-scoped fixture's
#   server thread) is judged when that loop has stopped, at the end of the module, or at
#   the end of the session.
# - a task still pending when its asyncio.run or asyncio.Runner (pytest-asyncio's loop)
#   ended, so that the runner had to cancel it, is a leak: nobody owned it.
# After every module, and at the end of the session, the garbage collector runs while the
# interpreter is fully alive; then a suspended coroutine that no task drives, an async
# generator suspended when no loop runs, and a loop left open are leaks of that module; at
# the end of the session, so is every task still pending. A leak fails the test at whose
# teardown it is found (the session, at the end) and names what it is and where it waits.


class LeakError(AssertionError):
    """A test left a task, a coroutine or an event loop behind."""


_TASKS_BEFORE = pytest.StashKey[weakref.WeakSet[asyncio.Task[Any]]]()
#: pending tasks on a loop that was still running when their test ended -> that test
_DEFERRED: weakref.WeakKeyDictionary[asyncio.Task[Any], str] = weakref.WeakKeyDictionary()


def _all_tasks() -> list[asyncio.Task[Any]]:
    """Every task of every loop and thread (``asyncio.all_tasks`` sees one loop)."""
    registry = getattr(asyncio.tasks, "_all_tasks", None)  # 3.11
    if registry is None:
        registry = getattr(asyncio.tasks, "_scheduled_tasks", None)  # 3.12, 3.13
    if registry is None:
        return [o for o in gc.get_objects() if isinstance(o, asyncio.Task)]
    for _ in range(1000):
        try:
            return list(registry)
        except RuntimeError:  # changed during iteration by a loop in another thread
            continue
    return []


def _chain(obj: Any) -> str:
    """Where a coroutine (or a task's) is suspended: outermost first."""
    if isinstance(obj, asyncio.Task):
        obj = obj.get_coro()
    where = []
    while obj is not None:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None)
        frame = frame or getattr(obj, "gi_frame", None)
        if frame is None:
            break
        code = frame.f_code
        where.append(f"{code.co_qualname} ({Path(code.co_filename).name}:{frame.f_lineno})")
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
    return " -> ".join(where) or "?"


def _describe(task: asyncio.Task[Any]) -> str:
    loop = task.get_loop()
    state = "closed" if loop.is_closed() else "running" if loop.is_running() else "stopped"
    return f"task {task.get_name()!r} pending on a {state} loop, in {_chain(task)}"


def _dispose_crashed_processes() -> list[str]:
    crash = sys.modules.get("crash")  # tests/crash.py, once a test imported it
    dispose = getattr(crash, "dispose_graveyard", None)
    return [] if dispose is None else list(dispose())


#: tasks still pending when an ``asyncio.run`` or ``asyncio.Runner`` (pytest-asyncio's
#: loop for each async test) ended: nobody awaited them, the runner had to cancel them
_LEFT_TO_RUNNER: list[str] = []


def _watch_runners() -> None:
    """Note what a runner has to cancel at its end (it then cancels it as before)."""
    original = getattr(asyncio.runners, "_cancel_all_tasks", None)
    if original is None or getattr(original, "leak_guard", False):
        return

    def cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
        for task in asyncio.all_tasks(loop):
            if not task.done():
                _LEFT_TO_RUNNER.append(
                    f"task {task.get_name()!r} still pending when its runner ended"
                    f" (nobody awaited it), in {_chain(task)}"
                )
        original(loop)

    cancel_all_tasks.leak_guard = True  # type: ignore[attr-defined]
    asyncio.runners._cancel_all_tasks = cancel_all_tasks  # type: ignore[attr-defined]


_watch_runners()


#: what was reported once (a leak stays alive: it is not reported again by each module)
_REPORTED: weakref.WeakSet[Any] = weakref.WeakSet()


def _report(obj: Any, text: str, into: list[str]) -> None:
    if obj not in _REPORTED:
        _REPORTED.add(obj)
        into.append(text)


def _task_leaks(item: pytest.Item) -> list[str]:
    before = item.stash.get(_TASKS_BEFORE, None)
    leaks = _LEFT_TO_RUNNER[:]
    _LEFT_TO_RUNNER.clear()
    for task in _all_tasks():
        if task.done() or (before is not None and task in before):
            continue
        if task.get_loop().is_running():
            _DEFERRED.setdefault(task, item.nodeid)
        else:
            _report(task, _describe(task), leaks)
    return leaks


def _deferred_leaks(*, at_exit: bool) -> list[str]:
    """Deferred tasks whose loop has stopped (all of them at the end of the session)."""
    leaks: list[str] = []
    for task, nodeid in list(_DEFERRED.items()):
        if task.done():
            del _DEFERRED[task]
        elif at_exit or not task.get_loop().is_running():
            _report(task, f"{_describe(task)} (created by {nodeid})", leaks)
            del _DEFERRED[task]
    return leaks


def _heap_leaks(*, at_exit: bool) -> list[str]:
    """Collect garbage now, while the interpreter is fully alive; then list suspended
    coroutines that no pending task drives, loops never closed, and (at the end of the
    session) every task still pending."""
    gc.collect()
    objects = gc.get_objects()
    pending = [o for o in objects if isinstance(o, asyncio.Task) and not o.done()]
    # What a pending task drives; and what an async generator drives (a task awaiting
    # one's __anext__ reaches it through an object that does not say which generator).
    drivers = [t.get_coro() for t in pending]
    drivers += [o.ag_await for o in objects if isinstance(o, types.AsyncGeneratorType)]
    owned: set[int] = set()
    for coro in drivers:
        while coro is not None:
            owned.add(id(coro))
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    loops_running = any(
        isinstance(obj, asyncio.AbstractEventLoop) and obj.is_running() for obj in objects
    )
    leaks: list[str] = []
    if at_exit:
        for task in pending:
            _report(task, _describe(task), leaks)
    for obj in objects:
        if isinstance(obj, types.CoroutineType):
            suspended = inspect.getcoroutinestate(obj) == inspect.CORO_SUSPENDED
            if suspended and id(obj) not in owned:
                _report(obj, f"suspended coroutine, driven by no task: {_chain(obj)}", leaks)
        elif isinstance(obj, types.AsyncGeneratorType):
            # Its driver is not visible from a task: only blame it once no loop runs.
            frame = obj.ag_frame
            started = frame is not None and frame.f_lasti > 0 and not obj.ag_running
            if started and (at_exit or not loops_running):
                _report(obj, f"suspended async generator {_chain(obj)}", leaks)
        elif (
            isinstance(obj, asyncio.AbstractEventLoop)
            and not obj.is_closed()
            and (at_exit or not obj.is_running())
        ):
            _report(obj, f"event loop never closed: {obj!r}", leaks)
    del objects, pending
    return leaks


def _raise_leaks(what: str, leaks: Sequence[str], *, most: int = 30) -> None:
    __tracebackhide__ = True  # the report is the message, not the guard's code
    if not leaks:
        return
    kinds = collections.Counter(re.sub(r"'Task-\d+'", "'Task-N'", x) for x in leaks)
    lines = [f"{n} x {x}" if n > 1 else x for x, n in kinds.most_common(most)]
    if len(kinds) > most:
        lines.append(f"... and {len(kinds) - most} more kinds")
    text = "\n  ".join(lines)
    raise LeakError(
        f"{what} left behind {len(leaks)} (DESIGN.md: no task outlives its loop):\n  {text}"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    item.stash[_TASKS_BEFORE] = weakref.WeakSet(_all_tasks())
    _LEFT_TO_RUNNER.clear()  # left by something between tests: not this test's
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    __tracebackhide__ = True
    # The test is over: a process it "killed" may unwind now (never during the test).
    disposal = _dispose_crashed_processes()
    result = yield  # the fixtures' teardown, including the test's own event loop
    leaks = disposal + _task_leaks(item)
    module_done = nextitem is None or nextitem.module is not item.module  # type: ignore[attr-defined]
    if module_done:
        leaks += _deferred_leaks(at_exit=False)
        module = item.module.__name__  # type: ignore[attr-defined]
        leaks += [f"{x} (in {module})" for x in _heap_leaks(at_exit=False)]
    _raise_leaks(f"{item.nodeid}", leaks)
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaks = _dispose_crashed_processes()
    leaks += _deferred_leaks(at_exit=True)
    leaks += _heap_leaks(at_exit=True)
    if leaks:
        try:
            _raise_leaks("the test session", leaks)
        except LeakError as exc:
            sys.stderr.write(f"\nLEAK GUARD: {exc}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
