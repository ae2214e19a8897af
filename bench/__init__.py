"""Benchmarks of adai-kernels against the Adai and Adam implementations people use:
`python -m bench --device {cpu,cuda} [--quick]` (see bench/README.md)."""
