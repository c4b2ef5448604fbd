"""Benchmarks: matmul peak, attention blocks, decoding, MoE dispatch and training throughput (``attnlab bench``)."""
