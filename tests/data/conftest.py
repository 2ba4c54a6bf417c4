"""Shared data-test fixtures: a tiny synthetic shapes data set (with its BPE tokenizer) written once."""

import pytest

from jaxground.data import shapes


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes.write_dataset(out, train=48, val=10, test=10, size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def encoder(shapes_dir):
    from jaxground.data.pipeline import make_encoder, pipeline_config

    cfg = pipeline_config(num_image_tokens=4)
    cfg.datasets.shapes.path = str(shapes_dir)
    return make_encoder(cfg)[0]
