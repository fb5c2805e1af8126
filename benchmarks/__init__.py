"""resumer's benchmarks: not timed tests, but measured runs whose results are committed.

Run ``python -m benchmarks`` (all) or ``python -m benchmarks NAME`` (one); see
``benchmarks/__main__.py`` for how to add one. Results land in ``benchmarks/results/``;
scratch data (blobs, roots, server dirs) in the git-ignored ``benchmarks/work/``.
"""
