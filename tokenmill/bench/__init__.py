"""Benchmarks: HTTP load generation against any OpenAI-compatible server, and in-process baselines."""
