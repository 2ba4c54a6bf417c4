import pytest

from jaxground.data.tokenizer import TokenizerError, load_tokenizer, train_bpe
from jaxground.tokens import SPECIAL_TOKENS, TokenIds

TEXTS = ["Where is the red circle in the image?", "Answer: there is a small blue square.", "What is region?"] * 20


def test_bpe_special_ids_follow_the_base_vocabulary(tmp_path):
    train_bpe(TEXTS, tmp_path, vocab_size=120)
    tok, ids = load_tokenizer(tmp_path, ["<at>", "<boxes>", "<bin_0>", "<bin_1>"])
    base = len(tok) - len(SPECIAL_TOKENS) - 2
    assert ids == TokenIds.after(base, bos=1, eos=2, pad=0)
    assert tok.convert_tokens_to_ids(["<bin_0>", "<bin_1>"]) == [base + 5, base + 6]
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    # Special tokens are single ids inside text; plain text round-trips.
    got = tok("red<at><boxes>", add_special_tokens=False)["input_ids"]
    assert got[-2:] == [ids.at, ids.boxes]
    assert tok.decode(tok("the red circle", add_special_tokens=False)["input_ids"]) == "the red circle"


def test_bpe_knows_every_printable_character(tmp_path):
    """Characters the corpus lacks ("Z", "F", digits) are still tokens, not <unk>: answers like "Zero." and
    "Four: ..." survive encoding and decoding."""
    train_bpe(TEXTS, tmp_path, vocab_size=120)
    tok, _ = load_tokenizer(tmp_path, ["<at>", "<boxes>"])
    text = "Zero. Four: 10 QVXJK; it's!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_sentencepiece_llama_tokenizer(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=60, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    tok, ids = load_tokenizer(tmp_path)
    assert ids == TokenIds.after(60)  # LLaMA's rule: 32000.. for its 32000-entry vocabulary
    assert (ids.bos, ids.eos, ids.pad) == (1, 2, 0)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(60, 65))


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
