"""Runs one exported ONNX component with ONNX Runtime (the CPU flavour of every network model).

Parameters (from config.pbtxt):
  onnx_file           file name in the version folder (default model.onnx)
  intra_op_threads    ONNX Runtime threads (0: its default)
  num_train_timesteps timesteps must lie in [0, num_train_timesteps - 1]
  vocab_size          input_ids must lie in [0, vocab_size - 1]
  spatial_limits      JSON {input: [multiple, max]} for the last two axes of image-like inputs
  kandinsky_dims      the checkpoint's dims (output shapes of a call, latent <-> pixel sides)
  memory_fit          JSON: the estimated peak bytes of a call, measured at export (kandinsky_core.memory)
  memory_limit_bytes  the largest call this instance may run: its share of the server's memory budget
  memory_retain_bytes calls up to this keep ONNX Runtime's arena for the next; larger ones give it back

Memory (see kandinsky_core/memory.py and onnx_cpu.py): a request of which even one row exceeds the limit
is refused from its declared shapes, before its data is read (INVALID_ARG, naming the limit: it can never
run here); requests the dynamic batcher merged are split into batches that each fit, and a request too
large on its own runs in parts of as many rows as fit (rows are independent: the same bits, as the
step-batching tests check). A call estimated above `memory_retain_bytes` runs with arena shrinkage, so
the stub returns to its size before it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import numpy as np
from kandinsky_core.components import COMPONENTS, ModelDims
from kandinsky_core.memory import ModelMemory, call_size, format_gib
from kandinsky_core.onnx_cpu import CpuSession

from .base import BatchingModel, InvalidInput, require_finite, require_range

logger = logging.getLogger("kandinsky_repository")


class TritonPythonModel(BatchingModel):
    def setup(self, parameters: Mapping[str, str]) -> None:
        self.spec = COMPONENTS[self.name]
        self.dims = ModelDims.from_dict(json.loads(parameters["kandinsky_dims"]))
        path = self.version_dir / parameters.get("onnx_file", "model.onnx")
        threads = int(parameters.get("intra_op_threads", "0"))
        self.session = CpuSession(path, self.spec, self.dims, threads)
        self.num_train_timesteps = int(parameters.get("num_train_timesteps", "0"))
        self.vocab_size = int(parameters.get("vocab_size", "0"))
        self.spatial_limits = json.loads(parameters.get("spatial_limits", "{}"))
        self.memory = ModelMemory.from_parameters(parameters)

    def _estimate(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int, int, int]:
        """(estimated peak bytes, rows, height, width) of a call with these input shapes."""
        rows, height, width = call_size(self.spec, shapes, self.dims)
        needed = self.memory.fit.estimate(rows, height, width) if self.memory else 0
        return needed, rows, height, width

    def validate_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        if self.memory is None:
            return
        _, rows, height, width = self._estimate(shapes)
        needed = self.memory.excess(rows, height, width)
        if needed:
            size = f" at {height}x{width}" if self.memory.fit.spatial else ""
            raise InvalidInput(
                f"one row{size} needs an estimated {format_gib(needed)}; "
                f"{self.memory.limit_text(self.name)}: send a smaller size"
            )

    def split_group(self, group: list[tuple[int, dict[str, np.ndarray]]]) -> list[list]:
        """Consecutive requests in batches whose estimate stays within the limit (each request alone does:
        `validate_shapes`)."""
        if self.memory is None or len(group) == 1:
            return [group]
        parts: list[list] = [[]]
        rows = 0
        for item in group:
            shapes = {name: value.shape for name, value in item[1].items()}
            item_rows, height, width = call_size(self.spec, shapes, self.dims)
            if (
                parts[-1]
                and self.memory.fit.estimate(rows + item_rows, height, width) > self.memory.limit_bytes
            ):
                parts.append([])
                rows = 0
            parts[-1].append(item)
            rows += item_rows
        if len(parts) > 1:
            logger.info(
                "%s: split %d merged requests into %d batches (memory)", self.name, len(group), len(parts)
            )
        return parts

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
        needed, rows, height, width = self._estimate({name: value.shape for name, value in inputs.items()})
        if self.memory is None:
            return self.session.run(inputs, shrink=False)
        part = self.memory.rows_per_call(rows, height, width)
        if part >= rows or any(value.shape[0] != rows for value in inputs.values()):
            return self.session.run(inputs, shrink=needed > self.memory.retain_bytes)
        logger.info("%s: %d rows run in parts of %d (memory)", self.name, rows, part)
        shrink = self.memory.fit.estimate(part, height, width) > self.memory.retain_bytes
        outputs = [
            self.session.run(
                {name: value[start : start + part] for name, value in inputs.items()}, shrink=shrink
            )
            for start in range(0, rows, part)
        ]
        return {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}


__all__ = ["TritonPythonModel", "InvalidInput"]
