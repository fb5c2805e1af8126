"""Shared helpers: machine and peer descriptions, child timing with peak RSS, result files."""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
WORK = BENCH_DIR / "work"  # git-ignored scratch space

MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------- environment


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _first_line(cmd: Sequence[str]) -> str:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    # nginx -v prints to stderr; the others to stdout.
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {
        "curl": _first_line(["curl", "--version"]),
        "aria2c": _first_line(["aria2c", "--version"]),
        "nginx": _first_line(["nginx", "-v"]),
    }
    for dist in ("resumer", "aiohttp", "xxhash"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    out["resumer_commit"] = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return out


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------- fixtures


def load_servers() -> ModuleType:
    """``tests/servers.py`` imported by path: tests/ is not a package and we must not edit it."""
    return load_tests_module("servers")


def load_tests_module(stem: str) -> ModuleType:
    """``tests/STEM.py`` imported by path (as ``resumer_test_STEM``), once."""
    name = f"resumer_test_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    path = REPO / "tests" / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while building the classes.
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def random_blob(path: Path, size: int, seed: int) -> str:
    """A blob of seeded random bytes at ``path``; returns ``sha256:HEX``.

    Generated once: a sidecar JSON remembers size, seed and digest, so later runs reuse it.
    """
    meta = path.with_name(path.name + ".json")
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("size") == size and info.get("seed") == seed and path.stat().st_size == size:
            return str(info["digest"])
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sha = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        left = size
        while left:
            piece = rng.randbytes(min(left, 4 * MiB))
            sha.update(piece)
            f.write(piece)
            left -= len(piece)
    tmp.replace(path)
    digest = "sha256:" + sha.hexdigest()
    meta.write_text(json.dumps({"size": size, "seed": seed, "digest": digest}))
    return digest


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Run:
    """One timed child process."""

    wall_s: float
    maxrss_kib: int  # the child's own peak RSS (ru_maxrss is KiB on Linux)
    user_s: float
    sys_s: float
    returncode: int
    rss_source: str = "GNU time (wait4)"

    @property
    def maxrss_mib(self) -> float:
        return self.maxrss_kib / 1024


class RunError(RuntimeError):
    """A benchmarked command failed; carries its stderr."""


GNU_TIME = "/usr/bin/time"


def time_child(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Run:
    """Run ``cmd``; measure wall time and the child's peak RSS and CPU time.

    Why the detour through GNU time: Linux carries the pre-exec address space's RSS
    high-water mark into ``ru_maxrss`` across exec, and subprocess forks (vforks) from
    this Python process, so ``os.wait4`` on a direct child reports at least *our* peak
    RSS (tens of MiB, or hundreds after hashing a blob). GNU time forks from its own
    ~1 MiB process and reports ``ru_maxrss`` from its ``wait4`` on the command, which is
    the command's own figure. Without /usr/bin/time we fall back to ``os.wait4`` on the
    direct child, and say so in ``Run.rss_source``.
    """
    WORK.mkdir(parents=True, exist_ok=True)
    errfile, usage = WORK / "last-stderr.txt", WORK / "last-usage.txt"
    usage.unlink(missing_ok=True)
    via_time = Path(GNU_TIME).exists()
    argv = [GNU_TIME, "-f", "%M %U %S", "-o", str(usage), *cmd] if via_time else list(cmd)
    with errfile.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd
        )
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped by wait4: tell Popen so it does not wait again
    if code != 0:
        raise RunError(f"{' '.join(cmd)} exited {code}:\n{errfile.read_text(errors='replace')}")
    if via_time:
        # The last line: GNU time prefixes "Command exited…" lines only on failure.
        maxrss, user, sys_ = usage.read_text().split("\n")[-2].split()
        return Run(wall, int(maxrss), float(user), float(sys_), code, "GNU time (wait4)")
    return Run(wall, ru.ru_maxrss, ru.ru_utime, ru.ru_stime, code, "os.wait4 (incl. parent)")


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def median_or_none(xs: Sequence[float]) -> float | None:
    return median(xs) if xs else None


def run_medians(runs: Mapping[str, Sequence[Run]], size: int) -> dict[str, dict[str, float]]:
    """Per variant: median wall, peak RSS, user and sys CPU of its timed runs, and MB/s."""
    return {
        k: {
            "wall_s": median([r.wall_s for r in rs]),
            "maxrss_mib": median([r.maxrss_mib for r in rs]),
            "user_s": median([r.user_s for r in rs]),
            "sys_s": median([r.sys_s for r in rs]),
            "mb_per_s": size / 1e6 / median([r.wall_s for r in rs]),
        }
        for k, rs in runs.items()
    }


def outcome_medians(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], completed_too: Sequence[str] = ()
) -> dict[str, Any]:
    """Completed/runs, then the median of each key over all rows (for the keys in
    ``completed_too`` also ``KEY_completed``: over completed rows only, None if none)."""
    ok = [x for x in rows if x["completed"]]
    out: dict[str, Any] = {"completed": len(ok), "runs": len(rows)}
    for key in keys:
        out[key] = median([x[key] for x in rows])
        if key in completed_too:
            out[f"{key}_completed"] = median_or_none([x[key] for x in ok])
    return out


def rotated(items: Sequence[T], r: int) -> list[T]:
    """``items`` started at index ``r`` (mod len): round r's order, so no tool always runs first."""
    k = r % len(items)
    return [*items[k:], *items[:k]]


def fresh_dir(path: Path, *, sync: bool = False) -> None:
    """Empty ``path`` (recreated); with ``sync``, flush the deleted run's dirty pages now,
    not during the next tool's run."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    if sync:
        os.sync()


# --------------------------------------------------------------------------- results


def stamp(name: str, versions: dict[str, str]) -> dict[str, Any]:
    """The first keys of every results file: benchmark, date, machine, versions."""
    return {"benchmark": name, "date": now_utc(), "machine": machine(), "versions": versions}


def machine_line(m: dict[str, Any]) -> str:
    """The report's ``- **Machine:**`` line from ``machine()``'s dict."""
    return (
        f"- **Machine:** {m['nproc']} CPUs, {m['cpu']}, {m['memory_gib']} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}."
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """``results/NAME.md`` and ``results/NAME.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    md, js = RESULTS / f"{name}.md", RESULTS / f"{name}.json"
    md.write_text(markdown)
    js.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return md, js


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Run):
        return {**asdict(obj), "maxrss_mib": round(obj.maxrss_mib, 1)}
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """``python -m benchmarks NAME``'s parser, with the module docstring as its description."""
    return argparse.ArgumentParser(
        prog=f"python -m benchmarks {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def missing_tools(name: str, exes: Sequence[str]) -> bool:
    """Whether one of ``exes`` is not on PATH (then says which on stderr)."""
    for exe in exes:
        if shutil.which(exe) is None:
            print(f"{name}: {exe} is not on PATH", file=sys.stderr)
            return True
    return False


def finish(
    name: str,
    text: str,
    data: dict[str, Any],
    plot: Callable[[dict[str, Any]], Path],
    *,
    no_write: bool,
) -> int:
    """Print the report; unless ``no_write``, write results/NAME.{md,json} and the plot."""
    print(text)
    if no_write:
        return 0
    md, js = write_results(name, text, data)
    png = plot(data)
    print(f"wrote {md}, {js}, {png}")
    return 0


Panel = tuple[list[float], list[list[float]]]  # medians, and each one's per-run values


def run_panel(
    keys: Sequence[str],
    medians: Mapping[str, Mapping[str, float]],
    runs: Mapping[str, Sequence[Run]],
    field: str,
) -> Panel:
    """One ``plot_bars`` panel of timed runs: ``field`` (``wall_s``, ``maxrss_mib``…) per key."""
    return (
        [medians[k][field] for k in keys],
        [[float(getattr(r, field)) for r in runs[k]] for k in keys],
    )


def outcome_panels(
    cells: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]], fields: Sequence[str]
) -> dict[str, Panel]:
    """Per field, a ``plot_bars`` panel over ``(outcome_medians, rows)`` cells, one bar each.

    ``completed`` is drawn as the fraction of runs that completed (each run 0 or 1).
    """
    panels: dict[str, Panel] = {f: ([], []) for f in fields}
    for med, rows in cells:
        for f in fields:
            value = med[f] / med["runs"] if f == "completed" else med[f]
            panels[f][0].append(value)
            panels[f][1].append([float(x[f]) for x in rows])
    return panels


def plot_bars(
    path: Path,
    title: str,
    labels: Sequence[str],
    panels: Sequence[tuple[str, Sequence[float], Sequence[Sequence[float]], float | None]],
) -> Path:
    """One bar panel per ``(ylabel, medians, per-run values, goal line or None)``.

    The individual runs are drawn as dots over each bar, so spread is visible.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    xs = list(range(len(labels)))
    for ax, (ylabel, medians, runs, goal) in zip(axes[0], panels, strict=True):
        ax.bar(xs, medians, color="#4c72b0", alpha=0.8)
        for x, vals in zip(xs, runs, strict=True):
            ax.plot([x] * len(vals), vals, "k.", markersize=4)
        for x, m in zip(xs, medians, strict=True):
            ax.annotate(f"{m:.2f}", (x, m), ha="center", va="bottom", fontsize=8)
        if goal is not None:
            ax.axhline(goal, color="#c44e52", linestyle="--", linewidth=1, label="goal")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- lossy-link helpers
# Shared by cuts, power and links (added for issue 5; nothing above was changed).


def resumer_bin() -> list[str]:
    """The console script next to this interpreter (no PATH shims), else the entry point."""
    exe = Path(sys.executable).parent / "resumer"
    fallback = [sys.executable, "-c", "import sys; from resumer.cli import main; sys.exit(main())"]
    return [str(exe)] if exe.exists() else fallback


def more_versions() -> dict[str, str]:
    """Peers that ``peer_versions`` does not name: skopeo, the registry, containerd."""
    return {
        "skopeo": _first_line(["skopeo", "--version"]),
        "docker-registry": _first_line(["docker-registry", "--version"]),
        "containerd": _first_line(["containerd", "--version"]),
    }


def fetch_argv(
    url: str,
    digest: str,
    out: Path,
    root: Path,
    *extra: str,
    progress: str = "json",
    exe: list[str] | None = None,
) -> list[str]:
    """``resumer fetch URL --digest D -o OUT --root ROOT --progress P EXTRA...``: the one
    command line every benchmark times (``exe``: another build, e.g. a baseline)."""
    return [
        *(exe or resumer_bin()),
        "fetch",
        url,
        "--digest",
        digest,
        "-o",
        str(out),
        "--root",
        str(root),
        "--progress",
        progress,
        *extra,
    ]


def retrying_fetch_argv(url: str, digest: str, scratch: Path, attempts: int) -> list[str]:
    """``resumer fetch`` into ``scratch/out.bin`` with ``attempts`` tries, linear 1 s step."""
    return fetch_argv(
        url,
        digest,
        scratch / "out.bin",
        scratch / "root",
        "--max-download-attempts",
        str(attempts),
        "--retry-delay",
        "1",
    )


def retrying_curl_argv(url: str, scratch: Path, attempts: int) -> list[str]:
    """curl with 1 + (attempts − 1) retries, 1 s apart; each retry restarts from byte 0."""
    return [
        "curl",
        "-sS",
        "-f",
        "--retry",
        str(attempts - 1),
        "--retry-all-errors",
        "--retry-delay",
        "1",
        "-o",
        str(scratch / "out.bin"),
        url,
    ]


def retrying_aria2c_argv(url: str, digest: str, scratch: Path, attempts: int) -> list[str]:
    """aria2c, one connection, ``attempts`` tries 1 s apart (resumes), sha-256 checked."""
    return [
        "aria2c",
        "-x1",
        "-s1",
        f"--max-tries={attempts}",
        "--retry-wait=1",
        f"--checksum=sha-256={digest.removeprefix('sha256:')}",
        "--allow-overwrite=true",
        "--auto-file-renaming=false",
        "--file-allocation=none",
        "--console-log-level=warn",
        "--summary-interval=0",
        "-d",
        str(scratch),
        "-o",
        "out.bin",
        url,
    ]


class ProxyProcess:
    """``python -m resumer.lab.proxy`` as a child: one fresh proxy (and schedule) per run.

    A fresh process per run is what makes "same seed per run index" mean the same cut
    points for every tool: connection i of every run is cut at the same offset.
    """

    def __init__(
        self,
        target_port: int,
        seed: int,
        *,
        cut_after: tuple[int, int] | None = None,
        rate: float | None = None,
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "resumer.lab.proxy",
            "--target",
            f"127.0.0.1:{target_port}",
            "--seed",
            str(seed),
        ]
        if cut_after is not None:
            argv += ["--cut-after", f"{cut_after[0]}:{cut_after[1]}"]
        if rate is not None:
            argv += ["--rate", str(rate)]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # the proxy prints this once it listens
        if not line.startswith("listening on 127.0.0.1:"):
            self.proc.kill()
            self.proc.wait()
            raise RunError(f"proxy did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        self.counters: dict[str, int] = {}

    def stop(self) -> dict[str, int]:
        """SIGTERM, reap, and return the counters (bytes_down = bytes on the wire)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        for line in reversed(out.strip().splitlines()):
            if line.startswith("{"):
                self.counters = json.loads(line)
                break
        return self.counters


@dataclass(frozen=True)
class BenchImage:
    """An image pushed to the local registry: what the pull benchmarks copy."""

    repo: str
    tag: str
    manifest_digest: str
    layers: list[tuple[str, int]]  # (digest, size), in manifest order
    config_size: int
    manifest_size: int

    @property
    def payload(self) -> int:
        """Every byte a pull must fetch: layers, config and manifest."""
        return sum(s for _, s in self.layers) + self.config_size + self.manifest_size

    @property
    def largest(self) -> tuple[str, int]:
        return max(self.layers, key=lambda d_s: d_s[1])


def push_bench_image(
    registry_url: str,
    work: Path,
    layer_mib: Sequence[int],
    seed: int,
    repo: str = "bench/img",
    tag: str = "v1",
) -> BenchImage:
    """Build a seeded image of incompressible gzip layers and push it (skipped blobs exist)."""
    import asyncio

    from resumer.lab.images import LayerSpec, build_image, push_to_registry

    specs = [
        LayerSpec(size=m * MiB, compression="gzip", compressible=False, files=2) for m in layer_mib
    ]
    img = build_image(work / "image", specs, seed=seed)
    asyncio.run(push_to_registry(registry_url, repo, tag, img))
    return BenchImage(
        repo,
        tag,
        img.manifest_digest,
        [(x.digest, x.size) for x in img.layers],
        len(img.config),
        len(img.manifest),
    )


def oci_has_blobs(dest: Path, blobs: Sequence[tuple[str, int]]) -> bool:
    """Whether an OCI layout holds every (digest, size) blob, at full size."""
    for digest, size in blobs:
        p = dest / "blobs" / "sha256" / digest.removeprefix("sha256:")
        if not p.is_file() or p.stat().st_size != size:
            return False
    return (dest / "index.json").is_file()


def json_stats(stdout: str) -> dict[str, int]:
    """The ``{"stats": …}`` line that ``--progress json`` ends with, if any."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{") and '"stats"' in line:
            try:
                stats: dict[str, int] = json.loads(line)["stats"]
                return stats
            except (ValueError, KeyError):
                break
    return {}


@dataclass(frozen=True)
class Bounded:
    """One child run with a time limit."""

    returncode: int | None  # None: killed at the limit
    wall_s: float
    stdout: str
    stderr_tail: str


def run_bounded(
    argv: Sequence[str],
    limit_s: float,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Bounded:
    """Run ``argv`` in its own process group; SIGKILL the group at ``limit_s``; always reap."""
    import signal as _signal

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=limit_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, _signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    return Bounded(code, time.perf_counter() - t0, out, err.strip()[-600:])


# --------------------------------------------------------------------------- live proxy
# Added for issue 9 (the tear benchmark); nothing above was changed.


class LiveProxy:
    """``resumer.lab.proxy.FaultProxy`` on an event loop of its own in a daemon thread.

    Unlike ``ProxyProcess``, its counters can be read while a tool runs: ``bytes_down``
    (server→client bytes handed to the client's socket) is what lets a benchmark SIGKILL
    a tool at a byte offset rather than after a guessed time. An int read across threads
    is safe under the GIL; the proxy's loop is the only writer.
    """

    def __init__(self, target_port: int, seed: int, *, rate: float | None = None) -> None:
        import asyncio
        import threading

        from resumer.lab.proxy import FaultProxy, Faults

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.proxy = FaultProxy("127.0.0.1", target_port, Faults(rate=rate), seed=seed)
        fut = asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop)
        self.port: int = fut.result(timeout=15)
        self.counters: dict[str, int] = {}

    @property
    def bytes_down(self) -> int:
        return self.proxy.counters.bytes_down

    def stop(self) -> dict[str, int]:
        """Close the proxy, stop its loop and thread; return the final counters."""
        import asyncio

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
            self.counters = self.proxy.stats()
        return self.counters


# --------------------------------------------------------------------------- machine load
# Added for issue 10 (dockerd as a peer); nothing above was changed.


def load_line(before: Sequence[float], after: Sequence[float]) -> str:
    """The report's ``- **Load:**`` line: ``os.getloadavg()`` at the start and the end.

    Other work on a shared machine slows every tool of a run alike only on average; a
    load above the CPU count says the figures are from a busy machine.
    """
    fmt = ", ".join
    return (
        f"- **Load:** 1/5/15-min load average {fmt(f'{x:.2f}' for x in before)} at the "
        f"start and {fmt(f'{x:.2f}' for x in after)} at the end, on {os.cpu_count()} CPUs."
    )
