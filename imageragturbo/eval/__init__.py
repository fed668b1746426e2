"""Evaluation: prompt fidelity on the shapes world, latency and retrieval benchmarks."""
