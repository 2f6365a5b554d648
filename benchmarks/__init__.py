"""Benchmarks for sharded-broker, side by side with what users would otherwise pick.

Run with ``make bench`` (quick mode) or ``make bench-full``; the entry point is
``python -m benchmarks.run``. Every Redis-based figure of one run comes from the same
throwaway redis-server, so the ratios between them are comparable; absolute rates on a
shared machine are noisy and are not what we quote.
"""
