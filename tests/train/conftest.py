import pytest


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """A tiny synthetic shapes set (32 training scenes of 32 px, one object each) for `jaxground train` runs."""
    from jaxground.data.shapes import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, train=32, val=4, test=12, size=32, max_objects=1)
    return out
