import numpy as np
import pytest

from jaxground.data.conversation import IGNORE, BadSample


def _decode(encoder, ids):
    return encoder.tok.decode(ids.tolist())


def test_labels_exactly_cover_answers_and_eos(encoder):
    ids = encoder.ids
    boxes = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]], np.float32)
    turns = [("user", "What is region <loc>?", [[1]]), ("assistant", "A red circle.", []),
             ("user", "Where is the blue square?", []), ("assistant", "Answer: <loc> .", [[2, 0]])]
    enc = encoder.encode(turns, boxes)
    x, y = enc.input_ids, enc.labels
    assert x[0] == ids.bos and y[0] == IGNORE
    # Image block: exactly once, right after the first "USER:", never a target.
    start = int(np.nonzero(x == ids.im_start)[0][0])
    assert (x[start + 1 : start + 5] == ids.im_patch).all() and x[start + 5] == ids.im_end
    assert (x == ids.im_patch).sum() == 4
    # Targets are exactly the answers plus their </s>, copied from the ids, except <boxes>.
    target = y != IGNORE
    assert (y[target] == x[target]).all()
    assert (x == ids.eos).sum() == 2 and target[x == ids.eos].all()
    assert _decode(encoder, x[target]).replace(" ", "") == "Ared circle.</s>Answer:<at><at>.</s>".replace(" ", "")
    # <boxes> never a target; an <at> is a target only in an answer.
    assert not target[x == ids.boxes].any()
    ats = np.nonzero(x == ids.at)[0]
    assert [bool(target[i]) for i in ats] == [False, True, True]
    # Boxes in <boxes> order (question then answer), targets in trigger order.
    np.testing.assert_array_equal(enc.boxes, boxes[[1, 2, 0]])
    np.testing.assert_array_equal(enc.target_boxes, boxes[[2, 0]])
    assert enc.target_objects == [2, 0]
    # Text around the tokens is what the template says.
    text = _decode(encoder, x[x != ids.im_patch])
    assert "USER:" in text and text.count("ASSISTANT:") == 2 and encoder.system in text


def test_marker_count_mismatch_is_a_bad_sample(encoder):
    boxes = np.zeros((1, 4), np.float32)
    with pytest.raises(BadSample, match="1 <loc> markers but 2 box groups"):
        encoder.encode([("user", "Where is <loc>?", [[0], [0]]), ("assistant", "No.", [])], boxes, "k")


def test_literal_boxes_token_in_text_is_a_bad_sample(encoder):
    boxes = np.zeros((1, 4), np.float32)
    with pytest.raises(BadSample, match="<boxes> tokens for 0 boxes"):
        encoder.encode([("user", "Where is <boxes>?", []), ("assistant", "No.", [])], boxes, "k")


def test_turns_must_alternate(encoder):
    with pytest.raises(BadSample, match="alternate"):
        encoder.encode([("assistant", "Hi.", [])], np.zeros((0, 4), np.float32))


def test_num_format_writes_boxes_as_text(encoder):
    from jaxground.data.conversation import ConversationEncoder
    from jaxground.data.location_format import get_format

    enc = ConversationEncoder(encoder.tok, encoder.ids, get_format("num"), 4, "S.")
    out = enc.encode([("user", "Where is it?", []), ("assistant", "Answer: <loc> .", [[0]])],
                     np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    assert len(out.boxes) == 0 and len(out.target_boxes) == 0
    assert not (out.input_ids == encoder.ids.at).any()


def test_image_position_last_puts_the_image_after_the_question(encoder):
    from jaxground.data.conversation import ConversationEncoder

    ids = encoder.ids
    last = ConversationEncoder(encoder.tok, encoder.ids, encoder.fmt, 4, encoder.system, image_position="last")
    turns = [("user", "Where is the blue square?", []), ("assistant", "Answer: <loc> .", [[0]])]
    boxes = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)
    a, b = encoder.encode(turns, boxes), last.encode(turns, boxes)
    # The same tokens, labels and boxes; only the image block moves, from after "USER:" to before "ASSISTANT:".
    assert sorted(a.input_ids.tolist()) == sorted(b.input_ids.tolist())
    np.testing.assert_array_equal(a.labels[a.labels != IGNORE], b.labels[b.labels != IGNORE])
    np.testing.assert_array_equal(a.target_boxes, b.target_boxes)
    x = b.input_ids
    start, end = int(np.nonzero(x == ids.im_start)[0][0]), int(np.nonzero(x == ids.im_end)[0][0])
    assert "square?" in _decode(encoder, x[:start]).replace(" ", "")
    assert _decode(encoder, x[end + 1:]).replace(" ", "").startswith("ASSISTANT:")
    with pytest.raises(ValueError, match="image_position"):
        ConversationEncoder(encoder.tok, encoder.ids, encoder.fmt, 4, encoder.system, image_position="middle")


def test_piece_cache_gives_the_tokenizers_ids(encoder):
    """Repeated pieces come from the encoder's cache: the same ids as a first encoding and as the tokenizer."""
    boxes = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)
    turns = [("user", "Where is the red circle?", []), ("assistant", "Answer: <loc> .", [[0]])]
    first = encoder.encode(turns, boxes)
    assert "Where is the red circle?" in encoder._pieces
    again = encoder.encode(turns + [("user", "Where is the red circle now?", []), ("assistant", "Here.", [])], boxes)
    np.testing.assert_array_equal(again.input_ids[: len(first.input_ids)], first.input_ids)
    direct = encoder.tok("Where is the red circle?", add_special_tokens=False)["input_ids"]
    assert encoder._tokenize(["Where is the red circle?"]) == [direct]


def test_vicuna_tokenizer_ids_equal_the_released_codes_one_string_tokenization(tmp_path):
    """The released code tokenizes the whole prompt string with transformers 4.31's slow LlamaTokenizer (legacy):
    it splits at added tokens, strips the text beside NExT-Chat's tokens (added without an AddedToken, so
    stripped both sides) but not beside `</s>`, and SentencePiece-encodes each chunk with its dummy prefix. That
    rule, written out over the raw SentencePiece model, against our piecewise encoder on a LLaMA-style model
    (dummy prefix, spaces kept, byte fallback). The rule itself was checked once against transformers 4.31.0
    on this conversation: the same 197 ids."""
    import re

    import sentencepiece as spm

    from jaxground.data.conversation import DEFAULT_SYSTEM, ConversationEncoder
    from jaxground.data.location_format import get_format
    from jaxground.data.tokenizer import load_tokenizer

    corpus = [DEFAULT_SYSTEM, "USER: What is in the image? ASSISTANT: A man, a dog and a red car. Answer: yes.",
              "Where is the dog (in region)? Please give its box, and say why.", "How many? Two: the man and the woman."]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 30), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=400, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   add_dummy_prefix=True, remove_extra_whitespaces=False, byte_fallback=True,
                                   split_digits=True, character_coverage=1.0, minloglevel=2)
    fmt = get_format("emb")
    tok, ids = load_tokenizer(tmp_path, fmt.extra_tokens)
    encoder = ConversationEncoder(tok, ids, fmt, 4, DEFAULT_SYSTEM)
    turns = [("user", "What is the man<loc> holding? Give its box.", [[0]]),
             ("assistant", "A dog<loc>. It is brown, and (maybe) 2 years old.", [[1]]),
             ("user", "How many cats are there near <loc> ?", [[0]]), ("assistant", "Two: <loc> .", [[1, 2]]),
             ("user", "Is there a car?", []), ("assistant", "Answer: <loc> .", [[2]])]
    got = encoder.encode(turns, np.random.default_rng(0).random((3, 4), np.float32)).input_ids.tolist()

    image = "<im_start>" + "<im_patch>" * 4 + "<im_end>"
    prompt = DEFAULT_SYSTEM + " "
    for t, (role, text, groups) in enumerate(turns):
        text = text.replace("<loc>", "{}").format(*[" ".join(["<at> <boxes>"] * len(g)) for g in groups])
        text = f"{image} {text}" if t == 0 else text
        prompt += f"USER: {text} " if role == "user" else f"ASSISTANT: {text}</s>"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    stripped = {"<im_start>": ids.im_start, "<im_patch>": ids.im_patch, "<im_end>": ids.im_end, "<at>": ids.at,
                "<boxes>": ids.boxes}
    chunks = re.split("(" + "|".join(map(re.escape, [*stripped, "</s>"])) + ")", prompt)
    want = [ids.bos]
    for i, chunk in enumerate(chunks):
        if chunk in stripped or chunk == "</s>":
            want.append(stripped.get(chunk, ids.eos))
            continue
        if i > 0 and chunks[i - 1] in stripped:
            chunk = chunk.lstrip()
        if i + 1 < len(chunks) and chunks[i + 1] in stripped:
            chunk = chunk.rstrip()
        want += sp.encode(chunk) if chunk else []
    assert got == want
