"""Bringing models into ONNX (Hugging Face through optimum)."""
