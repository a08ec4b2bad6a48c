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

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from kandinsky_client.components import MAX_PROMPT_BYTES

from .base import BatchingModel, InvalidInput


def load_tokenizer(folder: Path):
    """A `tokenizers.Tokenizer` that pads with the pad token and truncates to the model's max length."""
    from tokenizers import Tokenizer

    config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    max_length = int(config["model_max_length"])
    pad_token = config.get("pad_token") or config["eos_token"]
    pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)
    return tokenizer


def tokenize(tokenizer, prompts: list[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(prompts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=bool),
    }


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
