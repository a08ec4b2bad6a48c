"""CLIP byte-level BPE tokenizers: built locally for the presets, and written explicitly for the bundle.

The presets' vocabulary has CLIP's layout: the 256 byte symbols, the same with the end-of-word marker
`</w>`, one entry per learned merge, then `<|startoftext|>` and `<|endoftext|>` last. The merges are
learned (deterministically: `_learn_merges`) on a small built-in corpus of prompt words, so common words
become single tokens, as with the released vocabulary.

The served tokenizer runs the `tokenizers` library on a `tokenizer.json`. Released checkpoints hold only
the slow files (`vocab.json` + `merges.txt`), and whether transformers writes a `tokenizer.json` when it
re-saves them depends on its version, so the export builds that file itself (`tokenizer_bundle`): from the
checkpoint's own `tokenizer.json` where it has one, otherwise by the fast conversion of the slow files
(the same normaliser, split, byte-level and post-processor as transformers' CLIP converter).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# The files of a tokenizer folder: the fast form, the slow form, and their configs.
TOKENIZER_JSON = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# First line of CLIP's merges.txt; the slow reader skips it (so the file must have it).
MERGES_HEADER = "#version: 0.2"
# At most this many merges are read (CLIP's 49152 BPE tokens less the 256 bytes and the 2 special
# tokens): what CLIP's own reader and transformers 4.x's slow CLIPTokenizer take from merges.txt.
CLIP_MAX_MERGES = 49152 - 256 - 2
# CLIP's word split (transformers' CLIPConverter and the original CLIP tokenizer).
CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Special tokens as the served tokenizer's config names them, with CLIP's defaults.
SPECIAL_TOKEN_DEFAULTS = {
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
}

# Words typical of image prompts; the trainer learns merges from them (weights do not matter here).
_CORPUS = """
a an the of in on at with and or by for from to under over near behind beside inside
photo photograph picture painting drawing sketch illustration render portrait landscape closeup
cat dog bird horse fox owl lion tiger bear rabbit fish dragon robot astronaut knight wizard
woman man girl boy child people crowd face eyes hair hand
red orange yellow green blue purple pink black white gray grey golden silver colorful
sunset sunrise night day morning evening sky clouds rain snow fog storm light shadow
mountain mountains forest river lake sea ocean beach island desert city street town village
castle house room garden field flowers flower tree trees sofa chair table window door
oil watercolor digital art style cinematic lighting highly detailed realistic photorealistic
beautiful cute dramatic epic fantasy futuristic vintage modern ancient magical
high quality resolution sharp focus trending artstation octane unreal engine
sitting standing running flying swimming wearing holding looking
big small tall tiny huge old young happy sad
"""


def _clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """CLIP's word split followed by byte-level mapping, as in transformers' CLIPTokenizer."""
    words = Regex(CLIP_WORD_PATTERN)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(words, behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def _clip_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )


def learn_clip_vocabulary(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn up to `num_merges` BPE merges on the built-in corpus; return (vocab, merges) in CLIP layout."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    merges = _learn_merges(_corpus_words(), num_merges)

    # CLIP's byte order (bytes_to_unicode): printable latin-1 first, then the remapped bytes.
    byte_symbols = sorted(alphabet, key=_clip_byte_rank)
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _corpus_words() -> Counter[tuple[str, ...]]:
    """The corpus split as the served tokenizer splits text: byte-level symbols, `</w>` on each word's last."""
    normalizer, pre_tokenizer = _clip_normalizer(), _clip_pre_tokenizer()
    words: Counter[tuple[str, ...]] = Counter()
    for line in _CORPUS.split("\n"):
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[(*word[:-1], word[-1] + END_OF_WORD)] += 1
    return words


def _learn_merges(words: Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, ties broken by the pair's text.

    Not the `tokenizers` BpeTrainer: it breaks ties between equally frequent pairs differently from run
    to run, so the same preset and seed gave different vocabularies (and token ids, and every number
    downstream). On a corpus of a few hundred words this loop takes milliseconds.
    """
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            merged[_merge(word, best)] += count
        words = merged
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _clip_byte_rank(symbol: str) -> int:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(symbol)
    return printable.index(code) if code in printable else 256 + code


def build_clip_tokenizer(num_merges: int, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer with a locally learned vocabulary, padded with `<|endoftext|>` like CLIP's."""
    vocab, merges = learn_clip_vocabulary(num_merges)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
    )


def token_text(value: Any) -> str | None:
    """A special token as configs hold it: a string, or a legacy `{"__type": "AddedToken", "content": ...}`."""
    return value.get("content") if isinstance(value, dict) else value


def read_merges(text: str) -> list[tuple[str, str]]:
    """merges.txt (one "a b" pair a line, after an optional `#version` header) as pairs, at most
    CLIP_MAX_MERGES of them, as CLIP's own reader takes them."""
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split()) for line in lines[:CLIP_MAX_MERGES]]  # type: ignore[misc]


def write_slow_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json and merges.txt as the released CLIP tokenizers store them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]
    (folder / MERGES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def fast_clip_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], special: dict[str, str]
) -> Tokenizer:
    """The fast CLIP tokenizer of slow files: what transformers' conversion builds, without transformers.

    Built here so that the bundle's `tokenizer.json` does not depend on which transformers version
    happens to re-save (or not) the checkpoint's tokenizer.
    """
    bos, eos, unk = special["bos_token"], special["eos_token"], special["unk_token"]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=unk,
        )
    )
    tokenizer.normalizer = _clip_normalizer()
    tokenizer.pre_tokenizer = _clip_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in dict.fromkeys((bos, eos, unk))])
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False, add_prefix_space=False
    )
    return tokenizer


def tokenizer_bundle(
    fetch: Callable[[str], Path | None], model_max_length: int
) -> tuple[Tokenizer, dict[str, Any]]:
    """The checkpoint's tokenizer as the served model reads it: a fast tokenizer and its config.

    `fetch(name)` returns the local path of one file of the checkpoint's tokenizer folder, or None where
    the folder has no such file. The config says what the served tokenizer needs and nothing else:
    the special tokens (as strings) and `model_max_length`.
    """
    config: dict[str, Any] = {}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):  # the special tokens map wins, as in transformers
        path = fetch(name)
        if path is not None:
            config.update(json.loads(path.read_text(encoding="utf-8")))
    special = {key: token_text(config.get(key)) or default for key, default in SPECIAL_TOKEN_DEFAULTS.items()}
    fast = fetch(TOKENIZER_JSON)
    if fast is not None:
        logger.info("tokenizer: the checkpoint's %s", TOKENIZER_JSON)
        tokenizer = Tokenizer.from_file(str(fast))
    else:
        vocab_path, merges_path = fetch(VOCAB_FILE), fetch(MERGES_FILE)
        if vocab_path is None or merges_path is None:
            raise FileNotFoundError(
                f"the checkpoint's tokenizer has neither {TOKENIZER_JSON} nor {VOCAB_FILE} + {MERGES_FILE}"
            )
        logger.info("tokenizer: converting the checkpoint's %s + %s", VOCAB_FILE, MERGES_FILE)
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        merges = read_merges(merges_path.read_text(encoding="utf-8"))
        tokenizer = fast_clip_tokenizer(vocab, merges, special)
    served_config = {
        **special,
        "model_max_length": int(config.get("model_max_length") or model_max_length),
        "tokenizer_class": "CLIPTokenizer",
    }
    return tokenizer, served_config


def write_tokenizer_bundle(folder: Path, tokenizer: Tokenizer, config: dict[str, Any]) -> None:
    """tokenizer.json and tokenizer_config.json, written by us (never by a transformers re-save)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if stale.is_file():
            stale.unlink()
    tokenizer.save(str(folder / TOKENIZER_JSON))
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
