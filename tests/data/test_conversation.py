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
