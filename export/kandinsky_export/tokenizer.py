"""A real CLIP byte-level BPE tokenizer built locally (the model hub is out of reach here).

The vocabulary has CLIP's layout: the 256 byte symbols, the same with the end-of-word marker `</w>`,
one entry per learned merge, then `<|startoftext|>` and `<|endoftext|>` last. The merges are learned
with the `tokenizers` library's BPE trainer on a small built-in corpus of prompt words, so common words
become single tokens, as with the released vocabulary.
"""

from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

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
    words = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(words, behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def learn_clip_vocabulary(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn up to `num_merges` BPE merges on the built-in corpus; return (vocab, merges) in CLIP layout."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer_model = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    trainer_model.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    trainer_model.pre_tokenizer = _clip_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) * 2 + num_merges,
        special_tokens=[],
        end_of_word_suffix=END_OF_WORD,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    trainer_model.train_from_iterator(_CORPUS.split("\n"), trainer)
    merges = [tuple(m) for m in json.loads(trainer_model.to_str())["model"]["merges"]][:num_merges]

    # CLIP's byte order (bytes_to_unicode): printable latin-1 first, then the remapped bytes.
    byte_symbols = sorted(alphabet, key=_clip_byte_rank)
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


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
