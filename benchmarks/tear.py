"""Kill and tear (issue 9): four SIGKILLs and one torn write in the partial, then resume.

A seeded 64 MiB random blob is served by nginx on 127.0.0.1 behind
``resumer.lab.proxy.FaultProxy`` (in-process, ``common.LiveProxy``) with a 20 MB/s rate
limit and no injected faults, so one life of a tool is a fraction of a second and the
proxy's live ``bytes_down`` counter says how far it got. Each run (fresh root, output and
proxy) starts the tool; life k (k = 1…4) is SIGKILLed (its process group) as soon as the
proxy has sent it B_k bytes in that life, B_k = U(0.12, 0.20) × blob size drawn from
``random.Random(SEED + round)`` (the same four draws for every tool in a round; together
at most 80 % of the blob, so every kill lands mid-transfer). After the SECOND kill, before
the third start, the partial is torn: opened r+b, 4096 zero bytes written at the middle
of the 1 MiB chunk that holds half of its current size (so exactly one chunk is hit, well
inside the data already written), fsynced. Then the tool is restarted, unkilled, until it
exits 0 (at most ``MAX_LIVES`` lives in all).

Tools, each restarted with the same command:

- ``resumer fetch URL --digest … -o … --root …`` (1 MiB chunks, the default);
- ``aria2c -c`` with its defaults: the ``.aria2`` control file is written at the start
  and then every 60 s (``--auto-save-interval``), so a life this short leaves a control
  file that records nothing;
- ``aria2c -c --auto-save-interval=0``: no control file, so ``-c`` resumes from the
  file's length (what the torn write then stays in);
- the same with ``--checksum=sha-256=…`` (aria2 checks the whole file at the end).

Wire bytes are measured at the server side twice: the proxy's ``bytes_down`` (what
crossed the rate-limited link, HTTP headers included) and nginx's ``$body_bytes_sent``
from its access log (what nginx handed to the proxy, which reads up to a few MiB ahead
of the link, so a kill costs more here); and for resumer also from its own ``attempts``
table in ROOT/state.db (``SUM(wire_bytes)``; an attempt killed in flight is never ended,
so its row keeps wire_bytes = 0). Goal: proxy wire / blob ≤ 1 + (4 kills + 1 torn
chunk) × 1 MiB / blob ≈ 1.078 at 64 MiB. resumer's output must be byte-identical to the
blob (sha256) or the benchmark fails; a peer's wrong output is a finding, reported.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resumer.content.partial import key_filename

from . import common
from .common import MiB

NAME = "tear"
SEED = 20240609
SIZE = 64 * MiB
QUICK_SIZE = 16 * MiB
RATE = 20e6  # bytes/s: 64 MiB in 3.4 s, one killed life 0.4–0.7 s
KILLS = 4
LIFE_SPAN = (0.12, 0.20)  # bytes a killed life gets, as a fraction of the blob
TEAR_AFTER = 2  # the tear comes after this kill, before the next start
TEAR_BYTES = 4096
CHUNK = 1 * MiB  # resumer's default chunk (resumer/config.py); the tear's granule
MAX_LIVES = 10  # KILLS killed lives + up to 6 unkilled ones
LIFE_LIMIT_S = 120.0  # an unkilled life that takes longer is killed and counted failed
POLL_S = 0.0005  # 0.5 ms at 20 MB/s: ~10 KB of overshoot


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    argv: Callable[[str, str, Path], list[str]]  # (url, digest, scratch) → argv
    partial: Callable[[str, Path], Path]  # (digest, scratch) → the partial file
    own: bool  # resumer: a wrong output fails the benchmark


def _resumer(url: str, digest: str, scratch: Path) -> list[str]:
    return common.fetch_argv(url, digest, scratch / "out.bin", scratch / "root")


def _resumer_partial(digest: str, scratch: Path) -> Path:
    return scratch / "root" / "ingest" / key_filename(digest)  # Ingest.partial_path


def _aria2c(*extra: str) -> Callable[[str, str, Path], list[str]]:
    def argv(url: str, digest: str, scratch: Path) -> list[str]:
        return [
            "aria2c",
            "-c",
            "-x1",
            "-s1",
            "--auto-file-renaming=false",
            "--file-allocation=none",
            "--console-log-level=warn",
            "--summary-interval=0",
            *(x.replace("DIGEST", digest.removeprefix("sha256:")) for x in extra),
            "-d",
            str(scratch),
            "-o",
            "out.bin",
            url,
        ]

    return argv


def _aria2c_partial(digest: str, scratch: Path) -> Path:
    return scratch / "out.bin"


TOOLS = [
    Tool("resumer", "resumer fetch", _resumer, _resumer_partial, own=True),
    Tool("aria2c", "aria2c -c", _aria2c(), _aria2c_partial, own=False),
    Tool(
        "aria2c_nosave",
        "aria2c -c --auto-save-interval=0",
        _aria2c("--auto-save-interval=0"),
        _aria2c_partial,
        own=False,
    ),
    Tool(
        "aria2c_nosave_sum",
        "aria2c -c --auto-save-interval=0 --checksum",
        _aria2c("--auto-save-interval=0", "--checksum=sha-256=DIGEST"),
        _aria2c_partial,
        own=False,
    ),
]
BY_KEY = {t.key: t for t in TOOLS}


def budgets(seed: int, size: int) -> list[int]:
    """The bytes each killed life gets: the same draws for every tool of a round."""
    rng = random.Random(seed)
    return [int(rng.uniform(*LIFE_SPAN) * size) for _ in range(KILLS)]


def tear(path: Path) -> dict[str, int]:
    """Zero 4 KiB in the middle of the chunk that holds half the partial's size; fsync."""
    size = path.stat().st_size if path.exists() else 0
    if size < 2 * CHUNK:
        raise common.RunError(f"{path}: {size} bytes after kill {TEAR_AFTER}, nothing to tear")
    chunk = (size // 2) // CHUNK
    offset = chunk * CHUNK + CHUNK // 2  # 4 KiB-aligned, wholly inside one chunk
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\0" * TEAR_BYTES)
        f.flush()
        os.fsync(f.fileno())
    return {"partial_size": size, "offset": offset, "chunk": chunk, "bytes": TEAR_BYTES}


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _settle(proxy: common.LiveProxy) -> int:
    """Wait until the proxy's counter has stopped moving (the dead client's connection is
    gone); returns it."""
    last, still = proxy.bytes_down, 0
    while still < 20:  # 20 × 5 ms unchanged
        time.sleep(0.005)
        now = proxy.bytes_down
        still = still + 1 if now == last else 0
        last = now
    return last


def one_life(
    argv: list[str], proxy: common.LiveProxy, budget: int | None, log: Path
) -> dict[str, Any]:
    """Start ``argv``; with a budget, SIGKILL its group once the proxy has sent it
    ``budget`` bytes. Returns what happened, the life's wire bytes (after it settled)
    and its output (the log of this life)."""
    start = proxy.bytes_down
    t0 = time.perf_counter()
    at_kill: int | None = None
    with log.open("ab") as out:
        out.write(f"--- life, budget {budget}\n".encode())
        out.flush()
        mark = out.tell()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
        try:
            if budget is not None:
                while proc.poll() is None:
                    if proxy.bytes_down - start >= budget:
                        os.killpg(proc.pid, signal.SIGKILL)
                        at_kill = proxy.bytes_down - start
                        break
                    time.sleep(POLL_S)
            code: int | None = proc.wait(timeout=LIFE_LIMIT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _kill_group(proc)
    wall = time.perf_counter() - t0
    wire = _settle(proxy) - start
    with log.open("rb") as f:
        f.seek(mark)
        text = f.read().decode(errors="replace")
    return {
        "budget": budget,
        "killed": at_kill is not None,
        "wire_at_kill": at_kill,  # the proxy's count for this life when it was killed
        "wire_bytes": wire,  # … and once the dead client's connection was gone
        "overshoot": None if at_kill is None or budget is None else at_kill - budget,
        "returncode": None if at_kill is not None else code,
        "wall_s": wall,
        "resumed_from": [int(x) for x in re.findall(r"Resuming from (\d+)", text)],
        "tail": "" if code == 0 else text.strip()[-300:],
    }


def attempts_table(root: Path) -> dict[str, Any] | None:
    """resumer's own account: the attempts rows of ROOT/state.db."""
    db = root / "state.db"
    if not db.exists():
        return None
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT run_id, attempt_no, start_offset, end_offset, wire_bytes, kept_bytes,"
            " discarded_bytes, discard_reason, ended IS NULL, error FROM attempts ORDER BY id"
        ).fetchall()
    finally:
        con.close()
    keys = (
        "run_id",
        "attempt_no",
        "start_offset",
        "end_offset",
        "wire_bytes",
        "kept_bytes",
        "discarded_bytes",
        "discard_reason",
        "open",
        "error",
    )
    listed = [dict(zip(keys, r, strict=True)) for r in rows]
    for a in listed:
        a["open"] = bool(a["open"])
    return {
        "wire_bytes": sum(a["wire_bytes"] for a in listed),
        "discarded_bytes": sum(a["discarded_bytes"] for a in listed),
        "rows": len(listed),
        "open_rows": sum(a["open"] for a in listed),
        "runs": len({a["run_id"] for a in listed}),
        "attempts": listed,
    }


NGINX_LINE = re.compile(r'"(?P<req>[^"]*)" (?P<status>\d{3}) (?P<body>\d+) ')


def nginx_body_bytes(log: Path, since: int) -> tuple[int, int, int]:
    """(Σ $body_bytes_sent, requests, new end offset) of the access log after ``since``."""
    with log.open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
        end = f.tell()
    total = n = 0
    for line in text.splitlines():
        m = NGINX_LINE.search(line)
        if m:
            total += int(m.group("body"))
            n += 1
    return total, n, end


def _wait_log(log: Path, since: int, requests: int) -> None:
    """nginx logs a request when it ends; wait (≤ 5 s) for the run's requests to appear."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if nginx_body_bytes(log, since)[1] >= requests:
            return
        time.sleep(0.02)


def run_once(
    tool: Tool,
    nginx_port: int,
    access_log: Path,
    digest: str,
    size: int,
    seed: int,
    rate: float,
    scratch: Path,
) -> dict[str, Any]:
    common.fresh_dir(scratch, sync=True)
    log = scratch / "tool.log"
    since = access_log.stat().st_size if access_log.exists() else 0
    proxy = common.LiveProxy(nginx_port, seed, rate=rate)
    url = f"http://127.0.0.1:{proxy.port}/blob.bin"
    argv = tool.argv(url, digest, scratch)
    plan = budgets(seed, size)
    lives: list[dict[str, Any]] = []
    torn: dict[str, int] | None = None
    t0 = time.perf_counter()
    try:
        for i in range(MAX_LIVES):
            budget = plan[i] if i < KILLS else None
            life = one_life(argv, proxy, budget, log)
            lives.append(life)
            if i < KILLS and not life["killed"]:
                raise common.RunError(
                    f"{tool.key}: life {i + 1} ended (exit {life['returncode']}) before its "
                    f"kill at {budget} bytes: {life['tail']}"
                )
            if i + 1 == TEAR_AFTER:
                torn = tear(tool.partial(digest, scratch))
            if i >= KILLS and life["returncode"] == 0:
                break
    finally:
        counters = proxy.stop()
    wall = time.perf_counter() - t0
    _wait_log(access_log, since, counters.get("connections", 0))
    body, requests, _ = nginx_body_bytes(access_log, since)
    out = scratch / "out.bin"
    exited_ok = lives[-1]["returncode"] == 0
    got = common.file_sha256(out) if out.is_file() else None
    correct = got == digest
    if tool.own and not (exited_ok and correct):
        raise common.RunError(
            f"{tool.key}: {'exit 0' if exited_ok else 'did not finish'}, output "
            f"{'correct' if correct else f'WRONG ({got})'} after {len(lives)} lives; "
            f"last: {lives[-1]['tail']}"
        )
    wire = counters.get("bytes_down", 0)
    # What the tool can have received: a killed life's bytes up to the SIGKILL (what the
    # proxy writes after it, before it sees the reset, goes to a dead socket).
    to_kills = sum(
        x["wire_bytes"] if x["wire_at_kill"] is None else x["wire_at_kill"] for x in lives
    )
    table = attempts_table(scratch / "root") if tool.own else None
    return {
        "seed": seed,
        "budgets": plan,
        "tear": torn,
        "lives": lives,
        "completed": exited_ok,
        "correct": correct,
        "output_sha256": got,
        "wall_s": wall,
        "wire_bytes": wire,
        "wire_ratio": wire / size,
        "wire_to_kills": to_kills,
        "wire_to_kills_ratio": to_kills / size,
        "after_kills": sum(wire for wire in (x["wire_bytes"] for x in lives)) - to_kills,
        "connections": counters.get("connections", 0),
        "nginx_body_bytes": body,
        "nginx_requests": requests,
        "nginx_ratio": body / size,
        "attempts_table": table,
        "attempts_wire_ratio": None if table is None else table["wire_bytes"] / size,
    }


def measure(size: int, rounds: int, rate: float, tools: list[Tool]) -> dict[str, Any]:
    servers = common.load_servers()
    work = common.WORK / NAME
    docroot = work / "docroot"
    blob = docroot / "blob.bin"
    print(f"blob: {size} bytes, seed {SEED} …", flush=True)
    digest = common.random_blob(blob, size, SEED)
    ngx_dir = (work / "nginx").resolve()
    access_log = ngx_dir / "access.log"
    access_log.unlink(missing_ok=True)
    nginx = servers.start_nginx(docroot, ngx_dir, extra_server=f"access_log {access_log};")
    runs: dict[str, list[dict[str, Any]]] = {t.key: [] for t in tools}
    t0 = time.perf_counter()
    try:
        for r in range(rounds):
            seed = SEED + r
            for tool in common.rotated(tools, r):
                row = run_once(
                    tool, nginx.port, access_log, digest, size, seed, rate, work / "scratch"
                )
                runs[tool.key].append(row)
                att = row["attempts_wire_ratio"]
                print(
                    f"round {r + 1}/{rounds} {tool.key:18s} "
                    f"{'ok ' if row['completed'] else 'NOT DONE'} "
                    f"{'correct' if row['correct'] else 'WRONG  '} lives {len(row['lives'])} "
                    f"wire/blob proxy {row['wire_ratio']:.3f} nginx {row['nginx_ratio']:.3f}"
                    + ("" if att is None else f" attempts {att:.3f}")
                    + f" tear @{row['tear']['offset'] if row['tear'] else '-'}"
                    f" {row['wall_s']:.1f} s",
                    flush=True,
                )
        common.fresh_dir(work / "scratch", sync=True)
    finally:
        nginx.stop()
    return {
        "digest": digest,
        "runs": runs,
        "total_s": time.perf_counter() - t0,
        "nginx": nginx.host,
    }


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": common.median(xs), "min": min(xs), "max": max(xs)}


def summarise(
    size: int, rounds: int, rate: float, tools: list[Tool], measured: dict[str, Any]
) -> dict[str, Any]:
    goal = 1 + (KILLS + 1) * CHUNK / size
    med: dict[str, dict[str, Any]] = {}
    for t in tools:
        rows = measured["runs"][t.key]
        d: dict[str, Any] = {
            "runs": len(rows),
            "completed": sum(x["completed"] for x in rows),
            "correct": sum(x["correct"] for x in rows),
            "lives": _stats([len(x["lives"]) for x in rows]),
            "wall_s": _stats([x["wall_s"] for x in rows]),
            "wire_ratio": _stats([x["wire_ratio"] for x in rows]),
            "wire_to_kills_ratio": _stats([x["wire_to_kills_ratio"] for x in rows]),
            "nginx_ratio": _stats([x["nginx_ratio"] for x in rows]),
            # a wrong output is no success, whatever it cost
            "goal_met": sum(x["correct"] and x["wire_ratio"] <= goal for x in rows),
        }
        att = [x["attempts_wire_ratio"] for x in rows if x["attempts_wire_ratio"] is not None]
        d["attempts_wire_ratio"] = _stats(att) if att else None
        med[t.key] = d
    return {
        **common.stamp(NAME, common.peer_versions()),
        "blob": {
            "size": size,
            "seed": SEED,
            "digest": measured["digest"],
            "generator": "random.Random(seed).randbytes, 4 MiB pieces",
        },
        "server": f"nginx on {measured['nginx']} behind resumer.lab.proxy (in-process)",
        "rate_bytes_per_s": rate,
        "rounds": rounds,
        "seeds_per_round": [SEED + r for r in range(rounds)],
        "kills": KILLS,
        "life_span": LIFE_SPAN,
        "tear_after_kill": TEAR_AFTER,
        "tear_bytes": TEAR_BYTES,
        "chunk_bytes": CHUNK,
        "max_lives": MAX_LIVES,
        "goal_wire_ratio": goal,
        "tools": {
            t.key: {"label": t.label, "argv": t.argv("URL", "sha256:DIGEST", Path("DIR"))}
            for t in tools
        },
        "total_s": measured["total_s"],
        "medians": med,
        "runs": measured["runs"],
    }


def _tear_at(t: dict[str, int] | None) -> str:
    return "–" if t is None else f"{t['offset'] / MiB:.2f} of {t['partial_size'] / MiB:.2f}"


def _mmm(d: dict[str, float] | None, spec: str = ".3f") -> str:
    """``median (min–max)``."""
    if d is None:
        return "–"
    return f"{format(d['median'], spec)} ({format(d['min'], spec)}–{format(d['max'], spec)})"


def _table_cell(x: dict[str, Any]) -> str:
    table = x["attempts_table"]
    if table is None:
        return "–"
    discards = [a for a in table["attempts"] if a["discarded_bytes"]]
    why = ", ".join(f"{a['discard_reason']} {a['discarded_bytes'] / MiB:.2f} MiB" for a in discards)
    return (
        f"{x['attempts_wire_ratio']:.3f}; {table['rows']} rows, {table['open_rows']} never "
        f"ended (wire 0){'; discarded: ' + why if why else ''}"
    )


def render(data: dict[str, Any]) -> str:
    size, m, ver = data["blob"]["size"], data["machine"], data["versions"]
    lo, hi = data["life_span"]
    goal = data["goal_wire_ratio"]
    out = [
        "# Kill and tear (`python -m benchmarks tear`)\n",
        f"Measured {data['date']}; {data['rounds']} rounds (seeds "
        f"{', '.join(str(s) for s in data['seeds_per_round'])}); blob {size} bytes "
        f"({size / MiB:g} MiB) of seeded random bytes (seed {data['blob']['seed']}, "
        f"`{data['blob']['digest'][:23]}…`), {data['server']}, "
        f"{data['rate_bytes_per_s'] / 1e6:g} MB/s; whole benchmark {data['total_s']:.0f} s.\n",
        common.machine_line(m),
        f"- **Versions:** resumer {ver['resumer']} (commit {ver['resumer_commit']}); "
        f"{ver['aria2c']}; {ver['nginx']}.",
        f"- **Kills:** lives 1–{data['kills']} are SIGKILLed (process group) once the proxy "
        f"has sent that life U({lo:g}, {hi:g}) × blob bytes (seeded per round, the same draws "
        "for every tool; counter polled every 0.5 ms); later lives run until exit 0 "
        f"(≤ {data['max_lives']} lives in all). Fresh root, output and proxy per run; tools "
        "in an order rotated per round.",
        f"- **Tear:** after kill {data['tear_after_kill']}, {data['tear_bytes']} zero bytes "
        f"written (r+b, fsync) at the middle of the {data['chunk_bytes'] // MiB} MiB chunk "
        "holding half the partial's size (resumer: ROOT/ingest/<key>; aria2c: its output "
        "file).",
        "- **Wire:** the proxy's `bytes_down` (the rate-limited link, HTTP headers included) "
        "over all lives ÷ blob size; the same without what the proxy still wrote after each "
        "SIGKILL into the dead socket; nginx `$body_bytes_sent` from its access log ÷ blob "
        "size (this also counts what the proxy and the kernels had buffered ahead of the link "
        "when a life was killed); resumer's own `SUM(attempts.wire_bytes)` in state.db ÷ "
        "blob size (a killed attempt is never ended: its row keeps wire_bytes 0).",
        "- **Tools:** `resumer fetch URL --digest … -o … --root …` (1 MiB chunks); `aria2c -c` "
        "with its defaults (the .aria2 control file is written at the start and then every "
        "60 s); with `--auto-save-interval=0` (no control file: `-c` resumes from the file's "
        "length); and that with `--checksum=sha-256=…` (a whole-file check at the end). "
        "Each restarted with the same command.",
        f"- **Goal:** proxy wire / blob ≤ 1 + ({data['kills']} kills + 1 torn chunk) × "
        f"{data['chunk_bytes'] // MiB} MiB / blob = {goal:.3f}. Correct = sha256 of the "
        "output equals the blob's (resumer must be, or the benchmark fails; a peer's is "
        "reported as measured).\n",
        "## Results: median (min–max) over the rounds\n",
    ]
    rows = []
    for key, info in data["tools"].items():
        d = data["medians"][key]
        rows.append(
            [
                info["label"],
                f"{d['completed']}/{d['runs']}",
                f"{d['correct']}/{d['runs']}",
                _mmm(d["lives"], ".0f"),
                _mmm(d["wire_ratio"]),
                f"{d['goal_met']}/{d['runs']}",
                _mmm(d["wire_to_kills_ratio"]),
                _mmm(d["nginx_ratio"]),
                _mmm(d["attempts_wire_ratio"]),
                _mmm(d["wall_s"], ".1f"),
            ]
        )
    out.append(
        common.markdown_table(
            [
                "tool",
                "exit 0",
                "output correct",
                "lives",
                "wire / blob (proxy)",
                f"correct and ≤ goal {goal:.3f}",
                "wire / blob, bytes after a SIGKILL left out",
                "nginx body bytes / blob",
                "attempts table / blob",
                "wall (s)",
            ],
            rows,
        )
    )
    out.append("## Every run\n")
    per = []
    for key, info in data["tools"].items():
        for x in data["runs"][key]:
            resumed = [r for life in x["lives"] for r in life["resumed_from"]]
            codes = [str(life["returncode"]) for life in x["lives"] if not life["killed"]]
            per.append(
                [
                    info["label"],
                    x["seed"],
                    ", ".join(f"{life['wire_bytes'] / MiB:.2f}" for life in x["lives"]),
                    ", ".join(codes),
                    _tear_at(x["tear"]),
                    ", ".join(f"{r / MiB:.2f}" for r in resumed) or "–",
                    f"{x['wire_ratio']:.3f}",
                    f"{x['nginx_ratio']:.3f}",
                    _table_cell(x),
                    ("ok" if x["completed"] else "not done")
                    + (", correct" if x["correct"] else ", **WRONG**"),
                ]
            )
    out.append(
        common.markdown_table(
            [
                "tool",
                "seed",
                "proxy wire per life (MiB)",
                "exit codes after the kills",
                "tear at (MiB) of partial (MiB)",
                "resumer: 'Resuming from' (MiB)",
                "wire / blob",
                "nginx / blob",
                "attempts table / blob",
                "result",
            ],
            per,
        )
    )
    out.append(f"![wire per blob byte]({NAME}.png)\n")
    return "\n".join(out)


def plot(data: dict[str, Any]) -> Path:
    keys = list(data["tools"])
    labels = [data["tools"][k]["label"] for k in keys]
    runs = data["runs"]

    def panel(field: str) -> tuple[list[float], list[list[float]]]:
        return (
            [data["medians"][k][field]["median"] for k in keys],
            [[float(x[field]) for x in runs[k]] for k in keys],
        )

    return common.plot_bars(
        common.RESULTS / f"{NAME}.png",
        f"{KILLS} SIGKILLs + 1 torn 4 KiB write, median of {data['rounds']} ({data['date'][:10]})",
        labels,
        [
            ("wire / blob (proxy bytes_down)", *panel("wire_ratio"), data["goal_wire_ratio"]),
            ("nginx $body_bytes_sent / blob", *panel("nginx_ratio"), None),
        ],
    )


def main(argv: list[str]) -> int:
    from .fetch import parse_size

    p = common.parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"1 round of a {QUICK_SIZE // MiB} MiB blob, printed only (implies --no-write)",
    )
    p.add_argument("--size", type=parse_size, default=None, help="blob size (default 64MiB)")
    p.add_argument("--rate", type=float, default=RATE, metavar="BPS", help="link rate (bytes/s)")
    p.add_argument("--tool", action="append", choices=list(BY_KEY), help="only these (repeatable)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    size = args.size or (QUICK_SIZE if args.quick else SIZE)
    if rounds < 1 or size < 8 * CHUNK:
        p.error("--rounds ≥ 1 and --size ≥ 8MiB")
    if common.missing_tools(NAME, ("nginx", "aria2c")):
        return 1
    tools = [t for t in TOOLS if t.key in set(args.tool or BY_KEY)]
    measured = measure(size, rounds, args.rate, tools)
    data = summarise(size, rounds, args.rate, tools, measured)
    return common.finish(NAME, render(data), data, plot, no_write=args.no_write or args.quick)
