"""Whole-image pull speed: resumer pull against skopeo copy, from the real registry on loopback.

A 4-layer image of ~200 MiB of gzip blobs (compressible, source-code-like tar content from
``resumer.lab.images``) is pushed into the CNCF registry (Debian ``docker-registry``) on
127.0.0.1. Each round runs ``resumer pull … --progress none`` (fresh root) and
``skopeo copy docker://… oci:…`` (fresh layout) once each, the order alternating per
round; medians over the rounds.

A third peer, ``docker pull`` against dockerd 20.10 (``resumer.lab.dockerd``: a fresh daemon
per run on an empty vfs data root, started and stopped outside the timed span), runs in the
same rotation.

resumer does more than skopeo here: it decompresses every layer to check its diffID
(skopeo's oci: destination copies blobs and checks only their digests), fdatasyncs its
checkpoints and commits, and records every chunk in SQLite.

Goal (issue 4): resumer's median wall time ≤ 0.8× skopeo's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from resumer.lab.dockerd import Dockerd
from resumer.lab.dockerd import versions as dockerd_versions

from . import common
from .common import MiB, Run

NAME = "pull"
SEED = 4242
GOAL_RATIO = 0.8  # resumer / skopeo wall time
#: Uncompressed sizes of the four layers; gzip makes them ~2.9× smaller (~200 MiB in all).
LAYER_SIZES = (240 * MiB, 160 * MiB, 120 * MiB, 60 * MiB)
REPO, TAG = "bench/app", "v1"


def build_layout(work: Path) -> tuple[Path, dict[str, Any]]:
    """The image as an OCI layout, built once and reused while its recipe is unchanged."""
    from resumer.lab.images import LayerSpec, build_image, write_oci_layout

    recipe = {"seed": SEED, "layers": list(LAYER_SIZES), "compression": "gzip"}
    layout, meta = work / "layout", work / "image.json"
    if meta.exists() and json.loads(meta.read_text()).get("recipe") == recipe:
        return layout, dict(json.loads(meta.read_text()))
    shutil.rmtree(work / "build", ignore_errors=True)
    shutil.rmtree(layout, ignore_errors=True)
    print("building the image …", flush=True)
    image = build_image(
        work / "build",
        [LayerSpec(size=s, files=max(8, s // (4 * MiB))) for s in LAYER_SIZES],
        seed=SEED,
    )
    write_oci_layout(layout, image, TAG)
    info = {
        "recipe": recipe,
        "manifest_digest": image.manifest_digest,
        "layers": [
            {"digest": x.digest, "size": x.size, "uncompressed": x.uncompressed_size}
            for x in image.layers
        ],
        "compressed_bytes": image.total_layer_bytes(),
        "uncompressed_bytes": sum(x.uncompressed_size for x in image.layers),
    }
    meta.write_text(json.dumps(info, indent=2))
    return layout, info


def _variants(host: str, scratch: Path) -> dict[str, list[str]]:
    ref = f"{host}/{REPO}:{TAG}"
    return {
        "resumer": [
            *common.resumer_bin(),
            "pull",
            ref,
            "--root",
            str(scratch / "root"),
            "--progress",
            "none",
        ],
        "skopeo": [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            "-q",
            f"docker://{ref}",
            f"oci:{scratch / 'oci'}:{TAG}",
        ],
    }


KEYS = ("resumer", "skopeo", "dockerd")


def _dockerd_of(scratch: Path) -> Dockerd:
    return Dockerd(scratch / "dockerd")


def _time_docker_pull(host: str, scratch: Path, manifest_digest: str) -> Run:
    """``docker pull`` against a fresh dockerd (empty data root), started and stopped outside
    the timed span. Wall time is the client's, spawn to reap; peak RSS is the daemon's
    ``VmHWM`` (its high-water mark since its start: the download, the checks and the
    extraction into vfs all run in dockerd), CPU the client's plus the daemon's during the pull.
    """
    d = _dockerd_of(scratch)
    d.start()
    try:
        u0, s0 = d.cpu_s()
        run = common.time_child(d.pull_argv(f"{host}/{REPO}:{TAG}"), cwd=scratch)
        u1, s1 = d.cpu_s()
        hwm = d.status("VmHWM")
        if not d.has_image(f"{host}/{REPO}:{TAG}", manifest_digest):
            raise common.RunError("dockerd: the reference store does not name the manifest")
    finally:
        d.remove()
    return Run(
        run.wall_s,
        hwm,
        run.user_s + u1 - u0,
        run.sys_s + s1 - s0,
        run.returncode,
        "dockerd VmHWM (/proc), CPU client + daemon",
    )


def _check(key: str, scratch: Path, manifest_digest: str) -> None:
    """The output is a layout skopeo reads, naming the image's manifest."""
    dest = scratch / ("root" if key == "resumer" else "oci")
    out = subprocess.run(
        ["skopeo", "--insecure-policy", "inspect", f"oci:{dest}:{TAG}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise common.RunError(f"{key}: skopeo cannot read its output: {out.stderr}")
    digest = json.loads(out.stdout)["Digest"]
    # skopeo's copy to oci: keeps the manifest as it is (no conversion is needed for OCI).
    if digest != manifest_digest:
        raise common.RunError(f"{key}: output names {digest}, not {manifest_digest}")


def measure(rounds: int) -> dict[str, Any]:
    servers = common.load_servers()
    work = common.WORK / NAME
    layout, info = build_layout(work)
    shutil.rmtree(work / "registry", ignore_errors=True)
    registry = servers.start_registry(work / "registry")
    scratch = work / "scratch"
    runs: dict[str, list[Run]] = {k: [] for k in KEYS}
    load0 = os.getloadavg()
    try:
        servers.skopeo_copy(
            f"oci:{layout}:{TAG}", f"docker://{registry.host}/{REPO}:{TAG}", "--preserve-digests"
        )
        for r in range(rounds):
            for key in common.rotated(list(KEYS), r):
                common.fresh_dir(scratch, sync=True)
                if key == "dockerd":
                    run = _time_docker_pull(registry.host, scratch, info["manifest_digest"])
                else:
                    argv = _variants(registry.host, scratch)[key]
                    run = common.time_child(argv, cwd=scratch)
                    _check(key, scratch, info["manifest_digest"])
                runs[key].append(run)
                print(
                    f"round {r + 1}/{rounds} {key:8s} {run.wall_s:7.3f} s "
                    f"{run.maxrss_mib:6.1f} MiB",
                    flush=True,
                )
        common.fresh_dir(scratch, sync=True)
        version = subprocess.run(
            ["skopeo", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        reg_version = subprocess.run(
            ["docker-registry", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    finally:
        registry.stop()
    return {
        "host": registry.host,
        "image": info,
        "runs": runs,
        "load": [load0, os.getloadavg()],
        "skopeo": version,
        "registry": reg_version,
    }


def summarise(rounds: int, measured: dict[str, Any]) -> dict[str, Any]:
    runs: dict[str, list[Run]] = measured["runs"]
    size = measured["image"]["compressed_bytes"]
    med = common.run_medians(runs, size)
    ratio = med["resumer"]["wall_s"] / med["skopeo"]["wall_s"]
    return {
        **common.stamp(
            NAME,
            {
                **common.peer_versions(),
                **dockerd_versions(),
                "skopeo": measured["skopeo"],
                "docker-registry": measured["registry"],
            },
        ),
        "image": measured["image"],
        "server": f"docker-registry serve, filesystem storage, on {measured['host']}",
        "rounds": rounds,
        "method": (
            "each round runs both once, order alternating; fresh root / layout every "
            "run, deleted and os.sync() between runs; page cache not dropped; wall "
            "time from spawn to reap; peak RSS and CPU from GNU time; every output "
            "read back by skopeo inspect (outside the timed span); dockerd: a fresh daemon "
            "(vfs, empty data root) started before and removed after each timed `docker "
            "pull`, whose wall time is the client's; its peak RSS is the daemon's VmHWM and "
            "its CPU the client's plus the daemon's over the pull; done when dockerd's "
            "reference store names the tag and the manifest digest"
        ),
        "argv": {
            **_variants("HOST", Path("DIR")),
            "dockerd": _dockerd_of(Path("DIR")).pull_argv(f"HOST/{REPO}:{TAG}"),
        },
        "dockerd_argv": _dockerd_of(Path("DIR")).argv(),
        "ratio_dockerd": med["resumer"]["wall_s"] / med["dockerd"]["wall_s"],
        "load_average": measured["load"],
        "medians": med,
        "ratio": ratio,
        "goal": {"goal": f"≤ {GOAL_RATIO}× skopeo", "value": ratio, "met": ratio <= GOAL_RATIO},
        "runs": runs,
    }


def render(data: dict[str, Any], profile: str | None) -> str:
    m, med, img = data["machine"], data["medians"], data["image"]
    keys = [k for k in KEYS if k in data["runs"]]
    rows = []
    for key in keys:
        d = med[key]
        walls = [r.wall_s for r in data["runs"][key]]
        rows.append(
            [
                key,
                f"{d['wall_s']:.3f}",
                f"{min(walls):.2f}–{max(walls):.2f}",
                f"{d['mb_per_s']:.0f}",
                f"{d['wall_s'] / med['skopeo']['wall_s']:.3f}×",
                f"{d['wall_s'] / med['dockerd']['wall_s']:.3f}×" if "dockerd" in med else "–",
                f"{d['maxrss_mib']:.1f}",
                f"{d['user_s']:.2f}",
                f"{d['sys_s']:.2f}",
            ]
        )
    per_run = [[k, ", ".join(f"{r.wall_s:.2f}" for r in data["runs"][k])] for k in keys]
    goal = data["goal"]
    ver = data["versions"]
    layers = ", ".join(f"{x['size'] / MiB:.1f} MiB" for x in img["layers"])
    out = [
        "# Whole-image pull (`python -m benchmarks pull`)\n",
        f"Measured {data['date']}; {data['rounds']} rounds. Image: 4 gzip layers "
        f"({layers}; {img['compressed_bytes'] / MiB:.1f} MiB compressed, "
        f"{img['uncompressed_bytes'] / MiB:.0f} MiB uncompressed, source-code-like text "
        f"from `resumer.lab.images`, seed {SEED}), served by {data['server']}.\n",
        common.machine_line(m),
        *([common.load_line(*data["load_average"])] if "load_average" in data else []),
        f"- **Versions:** resumer {ver['resumer']} (commit {ver['resumer_commit']}), "
        f"aiohttp {ver['aiohttp']}; {ver['skopeo']}; {ver.get('dockerd', 'dockerd not run')}; "
        f"{ver['docker-registry']}.",
        f"- **Method:** {data['method']}.",
        "- **Work done:** resumer verifies each blob's sha256, decompresses every layer to "
        "verify its diffID, fdatasyncs checkpoints (≤ 4 MiB) and commits, and records "
        "chunks in SQLite; skopeo's `oci:` destination verifies blob digests only; dockerd "
        "verifies each blob's digest and extracts every layer into its vfs store (a full "
        "copy of the uncompressed files on disk), the most work of the three.\n",
        "## Medians\n",
        common.markdown_table(
            [
                "tool",
                "median wall (s)",
                "min–max (s)",
                "MB/s (compressed)",
                "÷ skopeo",
                "÷ dockerd",
                "median peak RSS (MiB)",
                "median user CPU (s)",
                "median sys CPU (s)",
            ],
            rows,
        ),
        "## Goal (issue 4)\n",
        common.markdown_table(
            ["goal", "measured", "result"],
            [[goal["goal"], f"{goal['value']:.3f}×", "met" if goal["met"] else "**missed**"]],
        ),
        "## Every run\n",
        common.markdown_table(["tool", "wall (s), in round order"], per_run),
        "![median wall time and peak RSS](pull.png)\n",
    ]
    if profile:
        out += ["## Where resumer's time goes\n", profile.strip() + "\n"]
    return "\n".join(out)


def plot(data: dict[str, Any]) -> Path:
    keys = [k for k in KEYS if k in data["runs"]]
    med, runs = data["medians"], data["runs"]
    goal = GOAL_RATIO * med["skopeo"]["wall_s"]
    return common.plot_bars(
        common.RESULTS / f"{NAME}.png",
        f"{data['image']['compressed_bytes'] / MiB:.0f} MiB image from the registry on "
        f"loopback, median of {data['rounds']} ({data['date'][:10]})",
        keys,
        [
            ("wall time (s)", *common.run_panel(keys, med, runs, "wall_s"), goal),
            ("peak RSS (MiB)", *common.run_panel(keys, med, runs, "maxrss_mib"), None),
        ],
    )


def main(argv: list[str]) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5; the goal needs ≥ 5)")
    p.add_argument(
        "--no-write", action="store_true", help="print only; leave benchmarks/results/ alone"
    )
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be ≥ 1")
    data = summarise(args.rounds, measure(args.rounds))
    # A hand-written profile note (results/pull.profile.md) survives re-runs.
    note = common.RESULTS / f"{NAME}.profile.md"
    text = render(data, note.read_text() if note.exists() else None)
    return common.finish(NAME, text, data, plot, no_write=args.no_write)
