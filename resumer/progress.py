"""The CLI's renderers of progress events (tty, plain, json), in docker pull's shapes.

The events themselves, and the statistics, are the library's: see events.py.
"""

from __future__ import annotations

from typing import Any

from .events import Event, Stats, Status

# --- renderers ------------------------------------------------------------------------


class JsonRenderer:
    """One JSON object per line, in Docker's JSON message shape."""

    def __init__(self, out: Any) -> None:
        self.out = out

    def __call__(self, event: Event) -> None:
        import json

        self.out.write(json.dumps(event.to_json()) + "\n")
        self.out.flush()

    def stats(self, stats: Stats) -> None:
        import json

        self.out.write(json.dumps({"stats": stats.to_json()}) + "\n")
        self.out.flush()


class PlainRenderer:
    """One line per state change, for logs: progress lines only when the status changes.

    Every "Resuming from N" is a line (each is a new attempt); a "Retrying in N seconds"
    countdown is one line per retry, not one per tick.
    """

    def __init__(self, out: Any) -> None:
        self.out = out
        self._last: dict[str, Event] = {}

    def _changed(self, event: Event) -> bool:
        last = self._last.get(event.id)
        if last is None or last.status != event.status or event.status == Status.RESUMING:
            return True
        # A countdown ticks down; a new retry starts a new, longer one.
        return event.status == Status.RETRYING and (event.value or 0) >= (last.value or 0)

    def __call__(self, event: Event) -> None:
        if event.error is not None:
            self.out.write(f"error: {event.error}\n")
        elif self._changed(event):
            self._last[event.id] = event
            prefix = f"{event.id}: " if event.id else ""
            detail = ""
            if event.status == Status.DOWNLOADING and event.total:
                detail = f" {format_bytes(event.current or 0)}/{format_bytes(event.total)}"
            self.out.write(f"{prefix}{event.text}{detail}\n")
        elif event.status == Status.RETRYING:
            self._last[event.id] = event  # the tick, to tell the next countdown from it
        self.out.flush()

    def stats(self, stats: Stats) -> None:
        self.out.write(format_stats(stats) + "\n")
        self.out.flush()


class TtyRenderer:
    """Live per-layer lines redrawn in place, like docker pull.

    A line without a layer id (an error, "Digest: …", "Status: …") closes the block of
    layer lines above it, which stays on screen as drawn; layer lines after it (the next
    pull of a ``resume``) start a new block below.

    Lines are cut to the terminal's width: a line that wrapped would take two rows and
    the cursor-up of the next redraw would land in the wrong place.
    """

    def __init__(self, out: Any, width: int | None = None) -> None:
        self.out = out
        self._width = width
        self._order: list[str] = []
        self._lines: dict[str, str] = {}
        self._drawn = 0

    @property
    def width(self) -> int:
        return self._width if self._width is not None else _terminal_width(self.out)

    def __call__(self, event: Event) -> None:
        if event.error is not None or not event.id:
            self._redraw()
            self.out.write((f"error: {event.error}" if event.error else event.text) + "\n")
            self._order, self._lines, self._drawn = [], {}, 0
            self.out.flush()
            return
        if event.id not in self._lines:
            self._order.append(event.id)
        self._lines[event.id] = f"{event.id}: {event.text}{_bar(event)}"
        self._redraw()

    def _redraw(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}A")
        cut = max(1, self.width - 1)
        for lid in self._order:
            self.out.write("\x1b[2K" + self._lines[lid][:cut] + "\n")
        self._drawn = len(self._order)
        self.out.flush()

    def stats(self, stats: Stats) -> None:
        self.out.write(format_stats(stats) + "\n")
        self.out.flush()


def _terminal_width(out: Any) -> int:
    """$COLUMNS, else the terminal's width, else 80 (a new pty may say 0 columns)."""
    import os

    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(out.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
    return columns if columns > 0 else 80


def _bar(event: Event) -> str:
    if event.status != Status.DOWNLOADING or not event.total:
        return ""
    width = 50
    cur = event.current or 0
    filled = min(width, width * cur // event.total)
    arrow = ">" if filled < width else ""
    return (
        f" [{'=' * max(0, filled - len(arrow))}{arrow}{' ' * (width - filled)}]"
        f"  {format_bytes(cur)}/{format_bytes(event.total)}"
    )


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.3g}{unit}" if unit != "B" else f"{n}B"
        value /= 1000
    return f"{n}B"


def format_stats(stats: Stats) -> str:
    ratio = stats.wire_bytes / stats.payload_bytes if stats.payload_bytes else 0.0
    return (
        f"Stats: payload {stats.payload_bytes} B, wire {stats.wire_bytes} B "
        f"({ratio:.3f}x), wasted {stats.wasted_bytes} B, attempts {stats.attempts}, "
        f"resumes {stats.resumes}"
    )


Renderer = JsonRenderer | PlainRenderer | TtyRenderer


def renderer(mode: str, out: Any) -> Renderer | None:
    """The renderer for ``--progress``; ``auto`` is tty on a terminal, else plain."""
    if mode == "auto":
        mode = "tty" if getattr(out, "isatty", lambda: False)() else "plain"
    if mode == "none":
        return None
    if mode == "json":
        return JsonRenderer(out)
    if mode == "plain":
        return PlainRenderer(out)
    return TtyRenderer(out)
