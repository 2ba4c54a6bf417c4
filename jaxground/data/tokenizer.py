"""Tokenizers: a local HF tokenizer (LLaMA/Vicuna `tokenizer.model` or `tokenizer.json`) with NExT-Chat's 5
special tokens appended (ids `TokenIds`: 32000..32004 for LLaMA) and the location format's extra tokens after
them; and `train_bpe`, the small BPE of the synthetic default, trained on its corpus and saved with the data.
"""

from __future__ import annotations

import string
from pathlib import Path

from jaxground.tokens import SPECIAL_TOKENS, TokenIds


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used."""


def load_tokenizer(path: str | Path, extra_tokens: list[str] = ()):
    """-> (tokenizer, TokenIds). `extra_tokens` (e.g. `get_format(name).extra_tokens`) are appended after the
    special tokens; ones already present keep their ids. Nothing is downloaded."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory not found: {path}")
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), unk_token="<unk>",
                                      bos_token="<s>", eos_token="</s>")
    elif (path / "tokenizer.model").is_file():
        from transformers import LlamaTokenizer

        tok = LlamaTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        raise TokenizerError(f"{path} has neither tokenizer.json nor tokenizer.model")
    return add_special_tokens(tok, extra_tokens)


def add_special_tokens(tok, extra_tokens: list[str] = ()):
    """Appends SPECIAL_TOKENS then `extra_tokens` (those missing) -> (tokenizer, TokenIds)."""
    vocab = tok.get_vocab()
    base = len(tok)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing and len(missing) != len(SPECIAL_TOKENS):
        raise TokenizerError(f"tokenizer has only some of the special tokens; missing {missing}")
    if missing:
        tok.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    extra = [t for t in dict.fromkeys(extra_tokens) if t not in tok.get_vocab()]
    if extra:
        tok.add_tokens(extra, special_tokens=True)
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if missing and ids != list(range(base, base + len(SPECIAL_TOKENS))):
        raise TokenizerError(f"special tokens got ids {ids}, expected {base}..{base + len(SPECIAL_TOKENS) - 1}")
    unk = tok.convert_tokens_to_ids("<unk>")
    token_ids = TokenIds(*ids, bos=tok.convert_tokens_to_ids("<s>"), eos=tok.convert_tokens_to_ids("</s>"),
                         pad=unk if unk is not None else 0)
    return tok, token_ids


def vocabulary_id(tok) -> str:
    """A short hash of the tokenizer's vocabulary (every token and its id, the added ones included): two
    tokenizers with the same id map text to the same ids. Saved with each training checkpoint; evaluating a model
    with another tokenizer of the same size ran silently with every id meaning another word."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


def train_bpe(texts: list[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Trains a sentencepiece-style BPE (Metaspace, `<unk>`=0 `<s>`=1 `</s>`=2, like LLaMA) over an alphabet of
    every printable ASCII character and saves `out_dir/tokenizer.json`; the special tokens are added when it is
    loaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # every printable ASCII character gets a token even when the corpus lacks it (a capital "Z" in "Zero." would
    # otherwise become <unk>, and the answer text would be lost)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=[c for c in string.printable if not c.isspace()],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out
