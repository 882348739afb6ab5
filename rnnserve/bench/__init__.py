"""Benchmarks: ``rnnserve bench <name>`` runs ``rnnserve.bench.<name>:main``."""
