"""`convert.layout`: a rule pattern filled backwards (the released names for training checkpoints' arrays)."""

import pytest

from jaxground.convert.layout import _fill


@pytest.mark.parametrize("pattern, groups, key", [
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", {1: "3"}, "model.layers.3.self_attn.q_proj.weight"),
    # optional parts included, the first alternative taken: the released form
    (r"model\.vision_tower\.(?:vision_model\.)?embeddings\.class_embedding", {},
     "model.vision_tower.vision_model.embeddings.class_embedding"),
    (r"sam\.model\.image_encoder\.(?:blocks|layers)\.(\d+)\.attn\.rel_pos_h", {1: "0"},
     "sam.model.image_encoder.blocks.0.attn.rel_pos_h"),
    (r"(visual|text)_projection", {1: "text"}, "text_projection"),
    (r"a(?:b|(c))(\d+)", {2: "7"}, "ab7"),  # groups are numbered as regex numbers them, nested ones too
    # no one key: a wildcard, a free repeat, a group without its value
    (r"text_model\..*", {}, None),
    (r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", {}, None),
    (r"(visual|text)_projection", {}, None),
])
def test_fill_names_the_key_a_pattern_matches(pattern, groups, key):
    assert _fill(pattern, groups) == key


@pytest.mark.parametrize("pattern", [r"a[bc]", r"a{2}", r"^a", r"(a", r"a)"])
def test_fill_refuses_what_it_does_not_read(pattern):
    with pytest.raises(ValueError, match="rule pattern"):
        _fill(pattern, {})
