"""Progress rendering: json (Docker's message shape), plain (one line per state change),
tty (live lines redrawn in place, checked on an emulated screen), and auto.

The renderers are fed scripted events; then the CLI renders a real pull from the real
registry in each mode, the tty one on a pseudo-terminal.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pty
import re
import subprocess
from pathlib import Path
from typing import Any

from conftest import PushImage
from test_resume_process import cli_env, layer_id, resumer_cmd

from resumer import progress as P
from resumer.events import Event, Stats, Status
from resumer.lab.images import LayerSpec, build_image

A, B = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
KiB = 1024

SCRIPT = [
    Event("v1", "Pulling from lab/app"),
    Event(A, Status.PULLING_FS_LAYER),
    Event(B, Status.PULLING_FS_LAYER),
    Event(B, Status.WAITING),
    Event(A, Status.DOWNLOADING, 100 * KiB, 1000 * KiB),
    Event(A, Status.DOWNLOADING, 200 * KiB, 1000 * KiB),
    Event(A, Status.RETRYING, value=5),
    Event(A, Status.RETRYING, value=4),
    Event(A, Status.RETRYING, value=3),
    Event(A, Status.RESUMING, 200 * KiB, 1000 * KiB, value=200 * KiB),
    Event(A, Status.DOWNLOADING, 300 * KiB, 1000 * KiB),
    Event(A, Status.RETRYING, value=10),  # a second retry: a new countdown
    Event(A, Status.RETRYING, value=9),
    Event(A, Status.RESUMING, 300 * KiB, 1000 * KiB, value=300 * KiB),
    Event(A, Status.DOWNLOADING, 1000 * KiB, 1000 * KiB),
    Event(A, Status.VERIFYING),
    Event(A, Status.DOWNLOAD_COMPLETE),
    Event(B, Status.DOWNLOADING, 10, 20),
    Event(B, Status.DOWNLOADING, 20, 20),
    Event(B, Status.VERIFYING),
    Event(B, Status.DOWNLOAD_COMPLETE),
    Event(A, Status.EXTRACTING),
    Event(A, Status.PULL_COMPLETE),
    Event(B, Status.EXTRACTING),
    Event(B, Status.PULL_COMPLETE),
    Event("", "Digest: sha256:" + "c" * 64),
    Event("", "Status: Downloaded newer image for lab/app:v1"),
]
STATS = Stats(payload_bytes=1020, wire_bytes=1100, wasted_bytes=80, attempts=4, resumes=2)


# ---------------------------------------------------------------------- json


def test_json_is_dockers_message_stream() -> None:
    out = io.StringIO()
    render = P.JsonRenderer(out)
    for e in SCRIPT:
        render(e)
    render(Event("", "", error="layer 1 sha256:ab: gave up after 5 attempt(s)"))
    render.stats(STATS)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(lines) == len(SCRIPT) + 2  # one object per event, nothing dropped
    assert lines[0] == {"id": "v1", "status": "Pulling from lab/app"}
    assert lines[4] == {
        "id": A,
        "status": "Downloading",
        "progressDetail": {"current": 100 * KiB, "total": 1000 * KiB},
    }
    assert lines[6] == {"id": A, "status": "Retrying in 5 seconds"}
    assert lines[9]["status"] == f"Resuming from {200 * KiB}"
    assert lines[-3] == {"status": "Status: Downloaded newer image for lab/app:v1"}
    msg = "layer 1 sha256:ab: gave up after 5 attempt(s)"
    assert lines[-2] == {"error": msg, "errorDetail": {"message": msg}}
    assert lines[-1] == {
        "stats": {
            "payload_bytes": 1020,
            "wire_bytes": 1100,
            "wasted_bytes": 80,
            "attempts": 4,
            "resumes": 2,
        }
    }


def test_retrying_in_one_second_is_singular() -> None:
    assert Event(A, Status.RETRYING, value=1).text == "Retrying in 1 second"
    assert Event(A, Status.RETRYING, value=2).text == "Retrying in 2 seconds"


# ---------------------------------------------------------------------- plain


def test_plain_is_one_line_per_state_change() -> None:
    out = io.StringIO()
    render = P.PlainRenderer(out)
    for e in SCRIPT:
        render(e)
    render(Event("", "", error="boom"))
    render.stats(STATS)
    assert out.getvalue().splitlines() == [
        "v1: Pulling from lab/app",
        f"{A}: Pulling fs layer",
        f"{B}: Pulling fs layer",
        f"{B}: Waiting",
        f"{A}: Downloading 102kB/1.02MB",  # the first progress line only
        f"{A}: Retrying in 5 seconds",  # one line per retry, not per tick
        f"{A}: Resuming from {200 * KiB}",
        f"{A}: Downloading 307kB/1.02MB",
        f"{A}: Retrying in 10 seconds",
        f"{A}: Resuming from {300 * KiB}",
        f"{A}: Downloading 1.02MB/1.02MB",
        f"{A}: Verifying Checksum",
        f"{A}: Download complete",
        f"{B}: Downloading 10B/20B",
        f"{B}: Verifying Checksum",
        f"{B}: Download complete",
        f"{A}: Extracting",
        f"{A}: Pull complete",
        f"{B}: Extracting",
        f"{B}: Pull complete",
        "Digest: sha256:" + "c" * 64,
        "Status: Downloaded newer image for lab/app:v1",
        "error: boom",
        "Stats: payload 1020 B, wire 1100 B (1.078x), wasted 80 B, attempts 4, resumes 2",
    ]


# ---------------------------------------------------------------------- tty


class Screen:
    """Just enough of a VT100 for our renderer: text, newline, cursor up, erase line."""

    def __init__(self, width: int = 200) -> None:
        self.rows: list[str] = [""]
        self.row = 0
        self.width = width

    def feed(self, data: str) -> None:
        i = 0
        while i < len(data):
            m = re.match(r"\x1b\[(\d*)([A-Za-z])", data[i:])
            if m:
                n, cmd = int(m.group(1) or 1), m.group(2)
                if cmd == "A":
                    self.row = max(0, self.row - n)
                elif cmd == "K":
                    self.rows[self.row] = ""
                else:
                    raise AssertionError(f"unexpected escape {m.group(0)!r}")
                i += len(m.group(0))
                continue
            ch = data[i]
            if ch == "\n":
                self.row += 1
                if self.row == len(self.rows):
                    self.rows.append("")
            elif ch == "\r":
                self.rows[self.row] = ""
            else:
                line = self.rows[self.row] + ch
                assert len(line) <= self.width, f"a line wrapped: {line!r}"
                self.rows[self.row] = line
            i += 1

    @property
    def text(self) -> list[str]:
        return [r for r in self.rows if r]


def test_tty_redraws_one_live_line_per_layer() -> None:
    out = io.StringIO()
    render = P.TtyRenderer(out, width=100)
    screen = Screen(width=100)
    frames: list[list[str]] = []
    for e in SCRIPT:
        before = len(out.getvalue())
        render(e)
        screen.feed(out.getvalue()[before:])
        frames.append(screen.text)
    render.stats(STATS)
    raw = out.getvalue()
    assert "\x1b[2K" in raw and "\x1b[3A" in raw  # redrawn in place, not appended
    # While A downloads: its one line has a bar at 20 % and the byte counts.
    during = frames[5]
    assert len(during) == 3
    assert during[0] == "v1: Pulling from lab/app" and during[2] == f"{B}: Waiting"
    assert during[1] == f"{A}: Downloading [{'=' * 9}>{' ' * 40}]  205kB/1.02MB"
    assert frames[7][1] == f"{A}: Retrying in 4 seconds"  # the countdown, in place
    # The end: one line per layer, each "Pull complete", then the closing lines.
    end = Screen(width=100)
    end.feed(raw)
    assert end.text == [
        "v1: Pulling from lab/app",
        f"{A}: Pull complete",
        f"{B}: Pull complete",
        "Digest: sha256:" + "c" * 64,
        "Status: Downloaded newer image for lab/app:v1",
        "Stats: payload 1020 B, wire 1100 B (1.078x), wasted 80 B, attempts 4, resumes 2",
    ]


def test_tty_starts_a_new_block_after_a_closing_line() -> None:
    """``resume`` of two pulls: the first block stays as drawn, the second goes below."""
    out = io.StringIO()
    render = P.TtyRenderer(out, width=100)
    for e in (
        Event(A, Status.DOWNLOADING, 1, 2),
        Event(A, Status.PULL_COMPLETE),
        Event("", "Status: one"),
        Event(B, Status.PULLING_FS_LAYER),
        Event(B, Status.PULL_COMPLETE),
        Event("", "Status: two"),
    ):
        render(e)
    screen = Screen(width=100)
    screen.feed(out.getvalue())
    assert screen.text == [
        f"{A}: Pull complete",
        "Status: one",
        f"{B}: Pull complete",
        "Status: two",
    ]


def test_tty_cuts_lines_to_the_terminal_width() -> None:
    out = io.StringIO()
    render = P.TtyRenderer(out, width=40)
    render(Event(A, Status.DOWNLOADING, 5, 10))
    render(Event(A, Status.DOWNLOADING, 6, 10))
    screen = Screen(width=40)
    screen.feed(out.getvalue())
    assert screen.text == [f"{A}: Downloading [=============="[:39]]


# ---------------------------------------------------------------------- auto


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_tty_on_a_terminal_else_plain() -> None:
    assert isinstance(P.renderer("auto", io.StringIO()), P.PlainRenderer)
    assert isinstance(P.renderer("auto", _Terminal()), P.TtyRenderer)
    assert isinstance(P.renderer("tty", io.StringIO()), P.TtyRenderer)
    assert isinstance(P.renderer("plain", _Terminal()), P.PlainRenderer)
    assert isinstance(P.renderer("json", _Terminal()), P.JsonRenderer)
    assert P.renderer("none", _Terminal()) is None


# ---------------------------------------------------------------------- the CLI


def _image(pushed_image: PushImage, tmp_path: Path) -> tuple[str, list[str]]:
    specs = [LayerSpec(size=64 * KiB), LayerSpec(size=96 * KiB, compression="zstd")]
    image = build_image(tmp_path / "build", specs, seed=51)
    pushed = pushed_image(repo="lab/progress", tag="v1", image=image)
    return pushed.reference, [layer_id(x.digest) for x in image.layers]


def _pull(ref: str, root: Path, mode: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        resumer_cmd("pull", ref, "--root", str(root), "--progress", mode),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _on_pty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stdout on a pseudo-terminal (stderr piped); return (code, what it drew)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = proc.wait(timeout=60)
    return code, b"".join(chunks).decode().replace("\r\n", "\n")


def test_cli_renders_a_real_pull_in_every_mode(pushed_image: PushImage, tmp_path: Path) -> None:
    ref, ids = _image(pushed_image, tmp_path)
    env = cli_env(tmp_path)

    # json: every line an object of Docker's shape; the stream ends with the stats.
    done = _pull(ref, tmp_path / "r-json", "json", env)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    for m in lines[:-1]:
        assert set(m) <= {"id", "status", "progressDetail"}, m
        if "progressDetail" in m:
            assert m["status"] == "Downloading" and set(m["progressDetail"]) == {"current", "total"}
    assert set(lines[-1]["stats"]) == {
        "payload_bytes",
        "wire_bytes",
        "wasted_bytes",
        "attempts",
        "resumes",
    }
    for lid in ids:
        assert {"id": lid, "status": "Pull complete"} in lines

    # plain: each layer's states once each, in order; no repeated line for a layer.
    done = _pull(ref, tmp_path / "r-plain", "plain", env)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    for lid in ids:
        mine = [x.split(": ", 1)[1].split(" ")[0:2] for x in out if x.startswith(f"{lid}: ")]
        states = [" ".join(s) for s in mine]
        assert states[0] == "Pulling fs" and states[-1] == "Pull complete", states
        assert all(a != b for a, b in itertools.pairwise(states)), states
    assert out[-2] == ref and out[-1].startswith("Stats: payload ")

    # auto on a pipe is plain: the same kind of lines, no escape codes.
    done = _pull(ref, tmp_path / "r-auto-pipe", "auto", env)
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout and f"{ids[0]}: Pull complete" in done.stdout

    # auto on a terminal is tty: lines redrawn in place, ending "Pull complete".
    code, drawn = _on_pty(
        resumer_cmd("pull", ref, "--root", str(tmp_path / "r-auto-tty"), "--progress", "auto"),
        {**env, "COLUMNS": "100"},
    )
    assert code == 0, drawn
    assert "\x1b[2K" in drawn and re.search(r"\x1b\[\d+A", drawn)
    screen = Screen(width=100)
    screen.feed(drawn)
    for lid in ids:
        assert f"{lid}: Pull complete" in screen.text, screen.text
    assert screen.text[-2] == ref and screen.text[-1].startswith("Stats: payload ")


def test_cli_json_error_line_has_dockers_shape(pushed_image: PushImage, tmp_path: Path) -> None:
    ref, _ = _image(pushed_image, tmp_path)
    missing = ref.rsplit(":", 1)[0] + ":no-such-tag"
    done = _pull(missing, tmp_path / "root", "json", cli_env(tmp_path))
    assert done.returncode == 1, done.stderr
    last: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    assert set(last) == {"error", "errorDetail"}
    assert last["errorDetail"] == {"message": last["error"]}
    assert "no-such-tag" in last["error"]
