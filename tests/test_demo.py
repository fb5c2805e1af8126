"""A shortened ``resumer demo`` runs end to end: a pull over a lossy link, a SIGKILL, a resume."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

from servers import SKOPEO_BIN, missing_binaries

from resumer.demo import _event
from resumer.events import Status

SIZE_MIB = 16


def _ratio(line: str) -> float:
    m = re.search(r"= ([0-9.]+)x the image", line)
    assert m, line
    return float(m.group(1))


def test_demo_pulls_through_cuts_and_a_kill_and_measures_the_baseline(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "resumer",
            "demo",
            "--size-mib",
            str(SIZE_MIB),
            "--seed",
            "3",
            "--workdir",
            str(tmp_path),
            "--progress",
            "plain",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = out.splitlines()

    # The pull was killed mid-way, then resumed from its partials to completion.
    assert "** SIGKILL at" in out
    assert re.search(r"run 1 \(pull, killed\)", out)
    assert re.search(r"run 2 \(resume\)", out)
    assert any("Resuming from" in x for x in lines)
    assert "Status: Downloaded newer image for 127.0.0.1:" in out
    result = next(x for x in lines if x.strip().startswith("result"))
    assert "verified sha256:" in result

    # Resuming costs a little over the image; restarting from zero never gets there.
    wire = next(x for x in lines if "resumer on the wire" in x)
    assert 1.0 <= _ratio(wire) < 1.3
    start = next(i for i, x in enumerate(lines) if x.strip().startswith("restart from zero"))
    baseline = lines[start : start + 3]
    assert "never completes" in baseline[0]
    assert _ratio(baseline[1]) > _ratio(wire)
    assert "measured" in baseline[2]

    # The layout is complete and right, checked here independently of the demo.
    root = tmp_path / "root"
    index = json.loads((root / "index.json").read_text())
    [entry] = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "1"
    digest = next(x.split("Digest: ")[1] for x in lines if "Digest: sha256:" in x)
    assert entry["digest"] == digest
    manifest = (root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
    doc = json.loads(manifest)
    assert len(doc["layers"]) == 4
    size = 0
    for desc in [doc["config"], *doc["layers"]]:
        blob = (root / "blobs" / "sha256" / desc["digest"].removeprefix("sha256:")).read_bytes()
        assert len(blob) == desc["size"]
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]
        size += len(blob)
    assert abs(size - (SIZE_MIB << 20)) < (SIZE_MIB << 20) * 0.15
    if not missing_binaries(SKOPEO_BIN):
        inspect = subprocess.run(
            [SKOPEO_BIN, "inspect", f"oci:{root}:1"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        info = json.loads(inspect.stdout)
        assert info["Digest"] == digest
        assert info["Layers"] == [d["digest"] for d in doc["layers"]]


def test_demo_rebuilds_events_from_json_lines() -> None:
    resuming = _event({"id": "abc", "status": "Resuming from 1048576"})
    assert (resuming.status, resuming.value, resuming.text) == (
        Status.RESUMING,
        1048576,
        "Resuming from 1048576",
    )
    retrying = _event({"id": "abc", "status": "Retrying in 2 seconds"})
    assert (retrying.status, retrying.value) == (Status.RETRYING, 2)
    down = _event(
        {"id": "abc", "status": "Downloading", "progressDetail": {"current": 5, "total": 9}}
    )
    assert (down.status, down.current, down.total) == (Status.DOWNLOADING, 5, 9)
    err = _event({"error": "boom", "errorDetail": {"message": "boom"}})
    assert err.error == "boom"
