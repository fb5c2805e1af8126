"""A shortened ``resumer demo`` runs end to end: lossy link, one SIGKILL, resume, verified."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_completes_after_a_kill_and_reports_wire_bytes(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "resumer",
            "demo",
            "--size-mib",
            "8",
            "--seed",
            "3",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "killed at" in run.stdout
    assert "result                         verified sha256:" in run.stdout
    wire_line = next(x for x in run.stdout.splitlines() if "bytes on the wire" in x)
    ratio = float(wire_line.split("(")[1].split("x")[0])
    # Resuming after cuts and a kill costs a little over the blob, never a restart.
    assert 1.0 <= ratio < 1.5
    assert (tmp_path / "layer.out").stat().st_size == 8 << 20
