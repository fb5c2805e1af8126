"""A real process: ``resumer fetch`` SIGKILLed mid-transfer, then run again, against nginx."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import NginxFactory

MiB = 1 << 20
SIZE = 32 * MiB


def _cmd(url: str, digest: str, out: Path, root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "resumer",
        "fetch",
        url,
        "--digest",
        digest,
        "-o",
        str(out),
        "--root",
        str(root),
        "--progress",
        "json",
    ]


def test_fetch_killed_with_sigkill_resumes_and_is_served_only_the_rest(
    tmp_path: Path, nginx_factory: NginxFactory
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(SIZE)
    (www / "blob").write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    # A slow link: nginx sends at most 8 MB/s, so the kill lands mid-transfer.
    srv = nginx_factory(www, extra_server="limit_rate 8m;")
    url = f"{srv.url}/blob"
    out, root = tmp_path / "out.bin", tmp_path / "root"

    first = subprocess.Popen(_cmd(url, digest, out, root), stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None
    killed_at = 0
    for line in first.stdout:  # progress lines arrive as the bytes do: no sleeping
        msg = json.loads(line)
        current = msg.get("progressDetail", {}).get("current", 0)
        if current >= SIZE // 2:
            killed_at = current
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert killed_at >= SIZE // 2
    assert not out.exists()  # nothing unverified is visible

    second = subprocess.run(
        _cmd(url, digest, out, root), capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    lines = [json.loads(x) for x in second.stdout.splitlines()]
    stats = lines[-1]["stats"]
    assert any(str(m.get("status", "")).startswith("Resuming from") for m in lines)
    # Served about the remaining bytes: at most what the kill cost on top (a few chunks).
    assert stats["wire_bytes"] <= SIZE - killed_at + 4 * MiB + 512 * 1024, stats
    assert stats["wire_bytes"] < SIZE
    assert stats["resumes"] == 1
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest[7:]
