"""Applying a checkpoint to images: ``predictor`` (the torch model, for every job that predicts)
and ``onnx`` (an ONNX export under ONNX Runtime, the scoring actors' other backend)."""
