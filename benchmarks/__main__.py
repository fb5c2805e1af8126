"""``python -m benchmarks [NAME [OPTIONS…]]``: run every registered benchmark, or one.

    python -m benchmarks                         # all, with their default options
    python -m benchmarks fetch                   # one
    python -m benchmarks fetch --rounds 3 --size 64MiB   # one, options passed through

Adding a benchmark (e.g. ``pull``, ``cuts``, ``power``, ``links``, ``tear``):

1. Create ``benchmarks/NAME.py`` with ``def main(argv: list[str]) -> int``. It parses its
   own options from ``argv`` (argparse with ``prog="python -m benchmarks NAME"``), keeps
   scratch data under ``common.WORK / NAME`` (git-ignored), and writes its results with
   ``common.write_results(NAME, markdown, data)`` and ``common.plot_bars(...)`` into
   ``benchmarks/results/NAME.{md,json,png}``. Return 0 on success.
2. Add one line to ``BENCHMARKS`` below: ``"NAME": "benchmarks.NAME"``. Modules are
   imported lazily, so one benchmark's missing tool never breaks the others.
3. Run it for real and commit ``benchmarks/results/NAME.*`` (never ``benchmarks/work/``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# name → module holding ``main(argv) -> int``. Order is the run order of ``python -m benchmarks``.
BENCHMARKS: dict[str, str] = {
    "fetch": "benchmarks.fetch",
    "pull": "benchmarks.pull",
    "cuts": "benchmarks.cuts",
    "power": "benchmarks.power",
    "links": "benchmarks.links",
    "tear": "benchmarks.tear",
    "serve": "benchmarks.serve",
    "mirror": "benchmarks.mirror",
    # last: gathers the reports above into results/SUMMARY.md
    "summary": "benchmarks.summary",
}


def load(name: str) -> Callable[[list[str]], int]:
    module = importlib.import_module(BENCHMARKS[name])
    fn: Callable[[list[str]], int] = module.main
    return fn


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("registered:", ", ".join(BENCHMARKS))
        return 0
    if argv:
        name, rest = argv[0], argv[1:]
        if name not in BENCHMARKS:
            print(
                f"unknown benchmark {name!r}; registered: {', '.join(BENCHMARKS)}", file=sys.stderr
            )
            return 2
        return load(name)(rest)
    worst = 0
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        worst = max(worst, load(name)([]))
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
