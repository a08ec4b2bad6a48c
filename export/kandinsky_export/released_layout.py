"""The `released` preset layout: a preset checkpoint rewritten the way the released repositories store it.

The released Kandinsky 2.2 uploads (kandinsky-community/kandinsky-2-2-{prior,decoder,decoder-inpaint})
differ from what `transformers`/`diffusers` write today, and each difference is a way for the loading
and export code to break on real weights while passing on presets. `apply_released_layout` turns a
preset written in the `current` layout into the released form, so the tests exercise those paths:

- tokenizer: `vocab.json` + `merges.txt` + `special_tokens_map.json` + a legacy `tokenizer_config.json`
  (AddedToken dicts), and no `tokenizer.json`;
- text encoder config: bos/eos/pad ids 0/2/1 (the old placeholders; transformers then pools with a plain
  argmax over the ids, which is right only because `<|endoftext|>` has the highest id);
- image encoder weights in fp16;
- image processor config in the legacy form (`size`/`crop_size` plain integers, a feature extractor type);
- minimal prior and prior-scheduler configs (library defaults for every key not written);
- decoder schedulers with `set_alpha_to_one` (a DDIM key, which `DDIMScheduler.from_config` picks up) and
  `clip_sample` as the released files have it now;
- `.bin` weights next to every `.safetensors` file;
- the decoder's MoVQ in `movq/`, and the inpainting decoder with its own MoVQ folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    read_merges,
    write_slow_files,
)

logger = logging.getLogger(__name__)

CURRENT = "current"
RELEASED = "released"
LAYOUTS = (CURRENT, RELEASED)

# diffusers version string the released configs carry (the uploads predate diffusers 0.19).
RELEASED_DIFFUSERS_VERSION = "0.18.0.dev0"
# The placeholder special-token ids of the released text encoder config.
RELEASED_TEXT_TOKEN_IDS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
# Keys the released decoder scheduler configs have beyond a clean DDPMScheduler config.
RELEASED_DECODER_SCHEDULER_EXTRA = {"set_alpha_to_one": False, "clip_sample": False}
# safetensors file name -> the .bin name the same library gives its pickled weights.
BIN_NAMES = {
    "model.safetensors": "pytorch_model.bin",
    "diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.bin",
}


def _legacy_token(content: str) -> dict[str, Any]:
    """A special token as tokenizers saved before transformers 4.30 wrote them."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def write_released_tokenizer(folder: Path, model_max_length: int) -> None:
    """Replace a `tokenizer.json` folder with the slow files and legacy configs of the released upload."""
    fast = _read_json(folder / TOKENIZER_JSON)["model"]
    vocab = fast["vocab"]
    raw_merges = fast["merges"]
    merges = (
        read_merges("\n".join(raw_merges))
        if raw_merges and isinstance(raw_merges[0], str)
        else [tuple(pair) for pair in raw_merges]
    )
    for stale in folder.iterdir():
        stale.unlink()
    write_slow_files(folder, vocab, merges)  # type: ignore[arg-type]
    _write_json(
        folder / SPECIAL_TOKENS_MAP,
        {
            "bos_token": _legacy_token(BOS_TOKEN),
            "eos_token": _legacy_token(EOS_TOKEN),
            "pad_token": EOS_TOKEN,
            "unk_token": _legacy_token(EOS_TOKEN),
        },
    )
    _write_json(
        folder / TOKENIZER_CONFIG,
        {
            "add_prefix_space": False,
            "bos_token": _legacy_token(BOS_TOKEN),
            "do_lower_case": True,
            "eos_token": _legacy_token(EOS_TOKEN),
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": EOS_TOKEN,
            "special_tokens_map_file": f"./{SPECIAL_TOKENS_MAP}",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": _legacy_token(EOS_TOKEN),
        },
    )


def _write_fp16_image_encoder(folder: Path) -> None:
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(folder).half()
    model.save_pretrained(folder)


def _write_bin_copies(root: Path) -> None:
    """A pickled `.bin` next to every `.safetensors` file, with the same tensors (as the uploads have)."""
    from safetensors.torch import load_file

    for weights in sorted(root.rglob("*.safetensors")):
        if weights.name not in BIN_NAMES:
            raise ValueError(f"{weights}: no .bin name known for this weights file")
        torch.save(load_file(weights), weights.with_name(BIN_NAMES[weights.name]))


def apply_released_layout(
    root: Path,
    prior_config: dict[str, Any],
    prior_scheduler: dict[str, Any],
    decoder_scheduler: dict[str, Any],
) -> None:
    """Rewrite the preset checkpoint under `root` (current layout) into the released layout, in place.

    `prior_config` and `prior_scheduler` are the constructor arguments the preset gave: the released
    configs hold only those (everything else is the library's default).
    """
    root = Path(root)
    prior_dir, decoder_dir, inpaint_dir = root / "prior", root / "decoder", root / "decoder_inpaint"
    text_config = prior_dir / "text_encoder" / "config.json"
    text = _read_json(text_config)
    write_released_tokenizer(prior_dir / "tokenizer", int(text["max_position_embeddings"]))
    _write_json(text_config, {**text, **RELEASED_TEXT_TOKEN_IDS})
    _write_fp16_image_encoder(prior_dir / "image_encoder")

    vision = _read_json(prior_dir / "image_encoder" / "config.json")
    processor = prior_dir / "image_processor" / "preprocessor_config.json"
    modern = _read_json(processor)
    _write_json(
        processor,
        {
            "crop_size": int(vision["image_size"]),
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": modern["image_mean"],
            "image_std": modern["image_std"],
            "resample": 3,
            "size": int(vision["image_size"]),
        },
    )
    version = {"_diffusers_version": RELEASED_DIFFUSERS_VERSION}
    _write_json(
        prior_dir / "prior" / "config.json",
        {"_class_name": "PriorTransformer", **version, **prior_config},
    )
    _write_json(prior_dir / "scheduler" / "scheduler_config.json", {**prior_scheduler, **version})
    for folder in (decoder_dir, inpaint_dir):
        _write_json(
            folder / "scheduler" / "scheduler_config.json",
            {**decoder_scheduler, **version, **RELEASED_DECODER_SCHEDULER_EXTRA},
        )
    if not (decoder_dir / "movq").is_dir() or not (inpaint_dir / "movq").is_dir():
        raise FileNotFoundError(f"{root}: the released layout has decoder/movq and decoder_inpaint/movq")
    _write_bin_copies(root)
    logger.info("rewrote %s in the released layout", root)
