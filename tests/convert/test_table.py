import numpy as np
import pytest
from flax import nnx

from jaxground.convert.reader import stream_mapping
from jaxground.convert.table import ConversionError, Rule, load_into, transpose
from jaxground.models.layers import linear


class Two(nnx.Module):
    def __init__(self):
        self.fc = nnx.List([linear(2, 3, ("embed", "mlp"), rngs=nnx.Rngs(i)) for i in range(2)])


RULES = [
    Rule(r"fc\.(\d+)\.weight", r"fc.\1.kernel", transpose),
    Rule(r"fc\.(\d+)\.bias", r"fc.\1.bias"),
    Rule(r".*inv_freq", None),
]


def _state(rng):
    return {f"fc.{i}.weight": rng.normal(size=(3, 2)).astype(np.float32) for i in range(2)} | {
        f"fc.{i}.bias": rng.normal(size=(3,)).astype(np.float32) for i in range(2)
    }


def test_load_into_transposes_and_drops():
    state = _state(np.random.default_rng(0)) | {"rotary.inv_freq": np.zeros(4)}
    m = load_into(Two(), stream_mapping(state), RULES)
    np.testing.assert_array_equal(np.asarray(m.fc[1].kernel[...]), state["fc.1.weight"].T)
    np.testing.assert_array_equal(np.asarray(m.fc[0].bias[...]), state["fc.0.bias"])


def test_every_problem_listed_once():
    state = _state(np.random.default_rng(0))
    del state["fc.0.bias"]
    state["fc.1.weight"] = np.zeros((4, 2), np.float32)
    state["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError) as e:
        load_into(Two(), stream_mapping(state), RULES)
    assert e.value.missing == ["fc.0.bias", "fc.1.kernel"]
    assert e.value.unexpected == ["extra.weight"]
    assert len(e.value.misshaped) == 1 and "fc.1.weight" in e.value.misshaped[0]


def test_legacy_non_zip_pickle_loads_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    from jaxground.convert.reader import stream

    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert [(k, load().tolist()) for k, load in stream(path)] == [("w", [0.0, 1.0, 2.0])]
