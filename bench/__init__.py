"""Benchmarks: the paper's claims reproduced on our own code, and the system's costs measured.

Each module is a command, `python -m bench.<name> [--quick]`, that prints its figures and writes
`bench/results/<name>.json` (with provenance) and a PNG plot. `make bench` runs them all,
`make bench-quick` a reduced version. They print numbers; nothing here asserts a timing.
"""
