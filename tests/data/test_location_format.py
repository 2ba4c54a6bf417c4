"""Location formats: format -> parse round trips within each format's precision, malformed text -> no box."""

import numpy as np
import pytest

from jaxground.data.location_format import get_format

BOXES = np.array([[0.1234, 0.0, 0.5678, 1.0], [0.3, 0.31, 0.9, 0.95]], np.float32)


def test_num_round_trip_shikra_style():
    fmt = get_format("num")
    text = fmt.format(BOXES)
    assert text == "[0.123,0.000,0.568,1.000;0.300,0.310,0.900,0.950]"
    assert fmt.extra_tokens == []
    np.testing.assert_allclose(fmt.parse(f"the cat {text} sits."), BOXES, atol=5e-4 + 1e-7)
    two = fmt.parse(f"{fmt.format(BOXES[:1])} and {fmt.format(BOXES[1:])}")
    np.testing.assert_allclose(two, BOXES, atol=5e-4 + 1e-7)


@pytest.mark.parametrize("num_bins", [224, 1000])
def test_bin_round_trip(num_bins):
    fmt = get_format("bin", num_bins=num_bins)
    assert len(fmt.extra_tokens) == num_bins and fmt.extra_tokens[-1] == f"<bin_{num_bins - 1}>"
    text = fmt.format(BOXES)
    assert text.count("<bin_") == 8
    parsed = fmt.parse(text.replace("><", "> <"))  # decoders may space the tokens
    np.testing.assert_allclose(parsed, BOXES, atol=0.5 / (num_bins - 1) + 1e-6)


def test_emb():
    fmt = get_format("emb")
    assert fmt.format(BOXES) == "<at> <boxes> <at> <boxes>"
    assert fmt.extra_tokens == ["<at>", "<boxes>"]
    assert fmt.parse("<at> <boxes>").shape == (0, 4)


@pytest.mark.parametrize(
    "name,text",
    [
        ("num", "[0.1,0.2,0.3]"),
        ("num", "[0.1,0.2,0.3,0.4"),
        ("num", "[a,b,c,d]"),
        ("num", ""),
        ("bin", "<bin_1><bin_2><bin_3>"),
        ("bin", "<bin_1><bin_2><bin_3><bin_999>"),
        ("bin", "<bin_x><bin_2><bin_3><bin_4>"),
    ],
)
def test_malformed_parses_to_no_box(name, text):
    out = get_format(name).parse(text)
    assert out.shape == (0, 4) and out.dtype == np.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown location format"):
        get_format("polygon")
    with pytest.raises(ValueError, match="shape"):
        get_format("num").format(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="num_bins"):
        get_format("bin", num_bins=1)
