"""Kandinsky 2.2 export: checkpoints (diffusers format or random-weight presets) -> ONNX -> TensorRT."""
