"""Benchmarks and audits of tritongpt2's kernels."""
