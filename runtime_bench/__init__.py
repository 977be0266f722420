"""Latency benchmarks across onnxruntime execution providers (arrives with the bench command)."""
