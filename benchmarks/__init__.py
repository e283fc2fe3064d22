"""Benchmarks and GPU drivers; ``perf.py`` is the entry point of the performance harness (``harness.py``)."""
