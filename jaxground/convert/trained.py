"""A `jaxground train` checkpoint as an export source. Its model is the one the run trained: the run config saved
with the checkpoint (`meta`) and the run's tokenizer give the NextChatConfig, as `jaxground predict` builds it; its
arrays take the released NExT-Chat names (`nextchat.released_layout`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read(path, tokenizer=None):
    """(the `<step>` directory, NextChatConfig, tokenizer directory, the location format's extra tokens) of a
    run's workdir, checkpoint directory or step directory; `tokenizer` replaces the run config's."""
    import ml_collections

    from jaxground import checkpoint
    from jaxground.data.location_format import get_format
    from jaxground.data.pipeline import make_encoder, tokenizer_path
    from jaxground.data.tokenizer import TokenizerError, vocabulary_id
    from jaxground.train.task import data_config, model_config

    step_dir, run = checkpoint.saved_config(path)
    config = ml_collections.ConfigDict(run)
    if tokenizer is not None:
        config.data.tokenizer = str(tokenizer)
    data = data_config(config, training=True)
    try:
        encoder, tokens = make_encoder(data)
    except TokenizerError as e:
        raise TokenizerError(f"{e} (the run's tokenizer, needed for its model config: pass --tokenizer DIR)") from None
    checkpoint.check_tokenizer(path, vocabulary_id(encoder.tok), tokenizer_path(data))  # a --tokenizer of another run
    extra = tuple(get_format(data.location_format).extra_tokens)
    return step_dir, model_config(config, tokens), Path(tokenizer_path(data)), extra


def layout(cfg, saved: dict, where: Path) -> list[dict]:
    """torch_layout of the saved arrays {NNX path: Orbax array metadata}, checked against `cfg`'s model."""
    from flax import nnx

    from jaxground.convert.nextchat import released_layout
    from jaxground.convert.store import model_factory, stored_variables

    variables = stored_variables(nnx.eval_shape(model_factory("nextchat", cfg)))
    want = {p: tuple(v.get_value().shape) for p, v in variables.items()}
    have = {p: tuple(m.shape) for p, m in saved.items()}
    if want != have:
        diff = sorted(p for p in want.keys() | have.keys() if want.get(p) != have.get(p))
        raise ValueError(f"{where} does not fit the model of the run config saved with it: "
                         + ", ".join(f"{p} {have.get(p)} vs {want.get(p)}" for p in diff[:5]))
    return released_layout(cfg, {p: (have[p], np.dtype(saved[p].dtype).name) for p in want})
