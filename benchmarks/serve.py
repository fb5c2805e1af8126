"""``resumer serve`` serving from its cache, on loopback.

1. A committed 1 GiB blob to curl (``-o /dev/null``), against nginx serving the same file
   (sendfile on, its defaults otherwise). Goal: at least 0.9x nginx's throughput. Each
   figure is the median of ``--rounds`` runs, the two servers alternating who goes first;
   curl's start-up is inside both timings.
2. Four skopeo clients pulling one ~200 MiB image at once from the warm cache (the
   upstream was pulled through once before): the aggregate throughput, image bytes times
   four over the wall time until the last copy ends.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from resumer.lab.serveproc import ResumerServe

from . import common as C

NAME = "serve"


def _start_serve(root: Path, upstream: str, log: Path) -> ResumerServe:
    """The mirror as an operator runs it: the console script, port 0, ready when it says."""
    return ResumerServe(root, upstream, log=log, command=C.resumer_bin()).start()


def _curl(url: str) -> C.Run:
    return C.time_child(["curl", "-sf", "-o", "/dev/null", url])


def blob_vs_nginx(work: Path, size: int, rounds: int) -> dict[str, Any]:
    servers = C.load_servers()
    blob = work / "blob.bin"
    digest = C.random_blob(blob, size, seed=4242)
    root = work / "root"
    store = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    store.parent.mkdir(parents=True, exist_ok=True)
    if not store.exists():
        os.link(blob, store)  # committed: the store's own file (the bytes are verified)
    docroot = work / "www"
    docroot.mkdir(exist_ok=True)
    if not (docroot / "blob.bin").exists():
        os.link(blob, docroot / "blob.bin")
    nginx = servers.start_nginx(docroot, work / "nginx")
    srv = _start_serve(root, "127.0.0.1:9", work / "serve.log")
    urls = {
        "resumer serve": f"{srv.url}/v2/bench/blob/blobs/{digest}",
        "nginx": f"{nginx.url}/blob.bin",
    }
    runs: dict[str, list[C.Run]] = {k: [] for k in urls}
    try:
        for k in urls:
            _curl(urls[k])  # warm the page cache and both servers
        for r in range(rounds):
            for k in C.rotated(list(urls), r):
                runs[k].append(_curl(urls[k]))
    finally:
        srv.stop()
        nginx.stop()
    medians = C.run_medians(runs, size)
    return {"size": size, "runs": runs, "medians": medians}


def four_clients(work: Path, layer_mib: list[int], rounds: int) -> dict[str, Any]:
    servers = C.load_servers()
    reg = servers.start_registry(work / "registry")
    procs: list[ResumerServe] = []
    try:
        img = C.push_bench_image(reg.url, work, layer_mib, seed=77, repo="library/bench")
        root = work / "cache-root"
        C.fresh_dir(root)
        srv = _start_serve(root, reg.host, work / "serve4.log")
        procs.append(srv)
        host = srv.host
        src = f"docker://{host}/library/bench:v1"

        def copy(dest: Path) -> None:
            servers.skopeo_copy(src, f"oci:{dest}:v1", timeout=600)

        C.fresh_dir(work / "warm")
        copy(work / "warm" / "oci")  # through the mirror once: the cache is warm
        walls = []
        for _ in range(rounds):
            dests = [work / "clients" / f"c{i}" for i in range(4)]
            C.fresh_dir(work / "clients", sync=True)
            threads = [threading.Thread(target=copy, args=(d,)) for d in dests]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            walls.append(time.perf_counter() - t0)
            for d in dests:
                if not C.oci_has_blobs(d, img.layers):
                    raise RuntimeError(f"{d}: the copy is incomplete")
        wall = C.median(walls)
        return {
            "image_bytes": img.payload,
            "walls_s": walls,
            "wall_s": wall,
            "aggregate_mb_per_s": 4 * img.payload / 1e6 / wall,
        }
    finally:
        for p in procs:
            p.stop()
        reg.stop()


def report(data: dict[str, Any]) -> str:
    a = data["blob"]
    m = a["medians"]
    ratio = m["resumer serve"]["mb_per_s"] / m["nginx"]["mb_per_s"]
    rows = [
        [k, f"{v['wall_s']:.3f}", f"{v['mb_per_s']:.0f}", f"{v['user_s']:.2f}", f"{v['sys_s']:.2f}"]
        for k, v in m.items()
    ]
    b = data["four"]
    lines = [
        "# resumer serve: serving from the cache on loopback",
        "",
        C.machine_line(data["machine"]),
        f"- **Date:** {data['date']}. Medians of {data['rounds']} rounds.",
        "",
        f"## A committed {a['size'] >> 20} MiB blob to curl",
        "",
        C.markdown_table(["server", "wall s", "MB/s", "curl user s", "curl sys s"], rows),
        f"resumer serve / nginx throughput: **{ratio:.2f}x** (goal >= 0.9x: "
        f"{'met' if ratio >= 0.9 else 'not met'}).",
        "",
        f"## Four skopeo clients pulling a {b['image_bytes'] / 1e6:.0f} MB image at once",
        "",
        f"Wall until the last copy ended: {b['wall_s']:.2f} s (runs: "
        + ", ".join(f"{w:.2f}" for w in b["walls_s"])
        + f"); aggregate {b['aggregate_mb_per_s']:.0f} MB/s (4 x image / wall). "
        "skopeo writes each copy to its own OCI layout on the same disk.",
        "",
    ]
    return "\n".join(lines)


def plot(data: dict[str, Any]) -> Path:
    m = data["blob"]["medians"]
    runs = data["blob"]["runs"]
    labels = list(m)
    per_run = [[data["blob"]["size"] / 1e6 / r.wall_s for r in runs[k]] for k in labels]
    return C.plot_bars(
        C.RESULTS / f"{NAME}.png",
        "committed blob over loopback (MB/s)",
        labels,
        [("MB/s", [m[k]["mb_per_s"] for k in labels], per_run, None)],
    )


def main(argv: list[str]) -> int:
    p = C.parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--layers-mib", default="80,60,40,20", help="the image's layers, in MiB")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if C.missing_tools(NAME, ["curl", "nginx", "skopeo", "docker-registry"]):
        return 1
    work = C.WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = C.stamp(NAME, {**C.peer_versions(), **C.more_versions()})
    data["rounds"] = args.rounds
    data["blob"] = blob_vs_nginx(work, args.size_mib * C.MiB, args.rounds)
    layers = [int(x) for x in args.layers_mib.split(",")]
    data["four"] = four_clients(work, layers, args.rounds)
    return C.finish(NAME, report(data), data, plot, no_write=args.no_write)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
