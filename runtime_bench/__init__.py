"""Latency benchmarks (`onnxprune bench`): onnxruntime per execution provider (`providers`, `latency`)
on synthetic or .npz inputs (`inputs`), torch 2:4 semi-structured GEMMs on CUDA (`gemm24`), and
the JSON / Markdown results (`report`)."""
