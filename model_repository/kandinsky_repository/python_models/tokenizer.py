"""The checkpoint's CLIP tokenizer: prompts -> input_ids and attention mask, as diffusers tokenizes.

It runs the `tokenizers` library directly on the `tokenizer.json` that the export builds itself from the
checkpoint's tokenizer (export/kandinsky_export/tokenizer.py: the checkpoint's own `tokenizer.json`, or
the fast conversion of released checkpoints' slow `vocab.json` + `merges.txt`), with padding to
`model_max_length` and truncation, like KandinskyV22PriorPipeline._encode_prompt. transformers itself is not imported here: the python backend
stub of the pytriton wheel cannot load the ssl module that transformers pulls in.

Each prompt is at most `max_prompt_bytes` of UTF-8 (`MAX_PROMPT_BYTES` of the registry, a config
parameter), checked before decoding or tokenizing: CLIP keeps 77 tokens anyway, and megabyte prompts
would only tie up the tokenizer. Bytes that are not valid UTF-8 (a lone surrogate included) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from kandinsky_core.components import MAX_PROMPT_BYTES
from kandinsky_core.processing import load_tokenizer, tokenize

from .base import BatchingModel, InvalidInput


def check_prompt_sizes(raw: np.ndarray, max_bytes: int = MAX_PROMPT_BYTES) -> None:
    """Every prompt at most `max_bytes` long, measured on the raw bytes (nothing decoded yet)."""
    for item in raw.reshape(-1):
        size = len(item) if isinstance(item, bytes) else len(str(item).encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise InvalidInput(f"input 'prompt' is {size} bytes of UTF-8; at most {max_bytes}")


def decode_prompts(raw: np.ndarray) -> list[str]:
    prompts = []
    for item in raw.reshape(-1):
        try:
            prompts.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError as error:
            raise InvalidInput(f"input 'prompt' is not valid UTF-8: {error}") from error
    return prompts


class TritonPythonModel(BatchingModel):
    def setup(self, parameters: Mapping[str, str]) -> None:
        self.tokenizer = load_tokenizer(self.version_dir / "tokenizer")
        self.max_prompt_bytes = int(parameters.get("max_prompt_bytes", MAX_PROMPT_BYTES))

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        check_prompt_sizes(inputs["prompt"], self.max_prompt_bytes)
        decode_prompts(inputs["prompt"])

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return tokenize(self.tokenizer, decode_prompts(inputs["prompt"]))
