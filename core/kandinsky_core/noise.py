"""Sources of Gaussian noise for the diffusion loops.

The client draws every random number through a `NoiseSource`, in the same order and with the same
shapes as the diffusers pipelines draw theirs. Seeded generation uses numpy; parity tests replay the
exact tensors that diffusers drew, which is how "same seed and initial noise" is checked without torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np


class NoiseSource(Protocol):
    """Anything that hands out standard-normal float32 arrays of a requested shape."""

    def randn(self, shape: Sequence[int]) -> np.ndarray: ...


class SeededNoise:
    """Standard-normal noise from numpy's PCG64 generator, reproducible for a given seed."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        return self._rng.standard_normal(tuple(shape), dtype=np.float32)


class ReplayNoise:
    """Hands out pre-recorded arrays in order; refuses a request whose shape differs from the record.

    Used to feed the client the very tensors a reference run drew, so that a mismatch in the order or
    shape of random draws shows up as an error rather than as a silent numeric difference.
    """

    def __init__(self, arrays: Iterable[np.ndarray]) -> None:
        self._arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
        self._next = 0

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        if self._next >= len(self._arrays):
            raise IndexError(f"ReplayNoise: draw {self._next} requested, only {len(self._arrays)} recorded")
        array = self._arrays[self._next]
        if tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"ReplayNoise: draw {self._next} requested shape {tuple(shape)}, recorded {array.shape}"
            )
        self._next += 1
        return array.copy()

    @property
    def remaining(self) -> int:
        """How many recorded draws were not consumed (a complete replay leaves 0)."""
        return len(self._arrays) - self._next
