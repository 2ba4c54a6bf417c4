"""Ids of NExT-Chat's added tokens. They are appended after the base vocabulary: 32000..32004 for LLaMA
(as the released NExT-Chat), `base_vocab + 0..4` for the small BPE tokenizer of the synthetic default. Models and data take a
`TokenIds` instead of hard-coding numbers."""

from __future__ import annotations

import dataclasses

SPECIAL_TOKENS = ("<im_patch>", "<im_start>", "<im_end>", "<at>", "<boxes>")


@dataclasses.dataclass(frozen=True)
class TokenIds:
    im_patch: int = 32000
    im_start: int = 32001
    im_end: int = 32002
    at: int = 32003
    boxes: int = 32004
    bos: int = 1
    eos: int = 2
    pad: int = 0  # LLaMA pads with unk (id 0)

    @classmethod
    def after(cls, base_vocab: int, *, bos: int = 1, eos: int = 2, pad: int = 0) -> TokenIds:
        """Special tokens appended at `base_vocab, base_vocab + 1, ...` in SPECIAL_TOKENS order."""
        return cls(*(base_vocab + i for i in range(len(SPECIAL_TOKENS))), bos=bos, eos=eos, pad=pad)
