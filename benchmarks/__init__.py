"""The performance benchmark suite (``make bench``): see benchmarks/README.md."""
