"""Tools shared by the tests, the benchmarks and the demo: a lossy proxy, a link emulator, an offline registry."""
