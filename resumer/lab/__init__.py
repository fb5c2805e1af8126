"""Tools shared by tests, benchmarks and the demo: a lossy proxy, a link emulator,
an offline registry and an image builder."""
