"""``python -m benchmarks summary``: one report of every benchmark's headline tables.

Each benchmark writes its own ``results/NAME.md``; this gathers their medians, goals and
per-schedule tables (every ``##`` section except the per-run listings and profiles) into
``results/SUMMARY.md``, so the clean-link figures of the core and pull issues and the
lossy-link figures sit in one report. It reads only what the benchmarks wrote.
"""

from __future__ import annotations

from benchmarks import common

ORDER = (
    "fetch",
    "pull",
    "cuts",
    "power",
    "power_cut_fs",
    "links",
    "links_docker",
    "tear",
    "serve",
    "mirror",
)
#: the command of a results file that is not its own benchmark's name
COMMAND = {"power_cut_fs": "power --scenario powercut", "links_docker": "links --tool docker"}
SKIP = ("## Every run", "## Where resumer's time goes")


def headline(markdown: str) -> str:
    """The title, the method lines and every section but the skipped ones."""
    out: list[str] = []
    keep = True
    for line in markdown.splitlines():
        if line.startswith("## "):
            keep = not line.startswith(SKIP)
        if line.startswith("# "):
            line = "#" + line  # a benchmark's title becomes a section of the summary
        elif line.startswith("## "):
            line = "#" + line
        if keep:
            out.append(line)
    return "\n".join(out).strip() + "\n"


def main(argv: list[str]) -> int:
    common.parser("summary", __doc__).parse_args(argv)  # no options; answers --help
    parts = [
        "# Benchmark summary\n",
        "Gathered from the files beside this one; each names its "
        "machine, seed, peer versions and method.\n",
    ]
    for name in ORDER:
        path = common.RESULTS / f"{name}.md"
        if path.exists():
            parts.append(headline(path.read_text()))
            parts.append(f"Full report: [{name}.md]({name}.md)\n")
        else:
            cmd = COMMAND.get(name, name)
            parts.append(f"## {name}\n\nNot run yet: `python -m benchmarks {cmd}`.\n")
    (common.RESULTS / "SUMMARY.md").write_text("\n".join(parts))
    print(f"wrote {common.RESULTS / 'SUMMARY.md'}")
    return 0
