"""Runs one exported ONNX component with ONNX Runtime (the CPU flavour of every network model).

Parameters (from config.pbtxt):
  onnx_file           file name in the version folder (default model.onnx)
  intra_op_threads    ONNX Runtime threads (0: its default)
  num_train_timesteps timesteps must lie in [0, num_train_timesteps - 1]
  vocab_size          input_ids must lie in [0, vocab_size - 1]
  spatial_limits      JSON {input: [multiple, max]} for the last two axes of image-like inputs
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from .base import BatchingModel, InvalidInput, require_finite, require_range


class TritonPythonModel(BatchingModel):
    def setup(self, parameters: Mapping[str, str]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = int(parameters.get("intra_op_threads", "0"))
        if threads:
            options.intra_op_num_threads = threads
        path = self.version_dir / parameters.get("onnx_file", "model.onnx")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.num_train_timesteps = int(parameters.get("num_train_timesteps", "0"))
        self.vocab_size = int(parameters.get("vocab_size", "0"))
        self.spatial_limits = json.loads(parameters.get("spatial_limits", "{}"))

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        for name, value in inputs.items():
            require_finite(name, value)
        if "timestep" in inputs and self.num_train_timesteps:
            require_range("timestep", inputs["timestep"], 0, self.num_train_timesteps - 1)
        if "input_ids" in inputs and self.vocab_size:
            require_range("input_ids", inputs["input_ids"], 0, self.vocab_size - 1)
        for name, (multiple, largest) in self.spatial_limits.items():
            height, width = inputs[name].shape[-2:]
            for axis, size in (("height", height), ("width", width)):
                if size % multiple or not multiple <= size <= largest:
                    raise InvalidInput(
                        f"input '{name}' {axis} is {size}; it must be a multiple of {multiple} "
                        f"in [{multiple}, {largest}]"
                    )

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, dict(inputs))
        return dict(zip(self.output_names, results, strict=True))


__all__ = ["TritonPythonModel", "InvalidInput"]
