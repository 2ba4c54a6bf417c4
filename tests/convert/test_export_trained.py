"""`jaxground export` of a training checkpoint: a tiny NextChat with SAM and the two training aids, random weights,
saved as `jaxground train` saves (Orbax manager, run config in `meta`, a sentencepiece LLaMA-style tokenizer) ->
export -> `jaxground convert` reads back exactly its arrays and config, the embedded default's choices that the
weights do not show included (sin-cos CLIP positions, heads other than the official models'); the exported directory loads into (a torch reference of)
the official classes with our projector, and its tokenizer already holds the NExT-Chat tokens at the model's ids."""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jaxground.cli import main

_spec = importlib.util.spec_from_file_location("_official_reference",
                                               Path(__file__).with_name("_official_reference.py"))
official = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(official)

AIDS = ("patch_head.", "attr_head.")
SAM = ("model.sam.img_size=32", "model.sam.patch_size=8", "model.sam.width=32", "model.sam.depth=2",
       "model.sam.num_heads=2", "model.sam.window_size=2", "model.sam.global_attn_indexes=(1,)",
       "model.sam.prompt_dim=16", "model.sam.mask_in_chans=4", "model.sam.decoder_depth=1",
       "model.sam.decoder_heads=2", "model.sam.decoder_mlp_dim=32", "model.sam.iou_head_hidden_dim=16")
# sin-cos positions (no table), CLIP heads of width 8 and SAM decoder heads 2: the weights alone would read as
# an official model's (head width 64, decoder heads 8), so config.json's `jaxground` entry must carry them
TINY = ("data.image_size=32", "data.num_image_tokens=16", "data.mask_size=16", "data.sam_size=32",
        "model.vision.image_size=32", "model.vision.hidden_size=32", "model.vision.intermediate_size=64",
        "model.vision.num_layers=2", "model.vision.num_heads=4", "model.vision.position_embedding=sincos",
        "model.vision.select_layer=-2", "model.llm.hidden_size=32", "model.llm.intermediate_size=64",
        "model.llm.num_layers=2", "model.llm.num_heads=2", "model.llm.num_kv_heads=1", "model.llm.max_position=96",
        *SAM)


def llama_tokenizer(directory: Path) -> Path:
    import sentencepiece as spm

    directory.mkdir()
    texts = ["Where is the red circle in the image?", "Answer: there is a small blue square."] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(directory / "tokenizer"),
                                   vocab_size=60, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    return directory


def random_model(cfg):
    """A NextChat with N(0, 0.05) arrays drawn in NumPy (eager initialisers compile once per shape: slow here)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxground.models.nextchat import NextChat

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NextChat(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.05, x.shape).astype(x.dtype)), abstract)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, model, cfg): the model saved under root/run as `jaxground train` saves it, exported to root/torch."""
    import optax
    from flax import nnx

    from jaxground import checkpoint
    from jaxground.config import load_config
    from jaxground.data.pipeline import make_encoder
    from jaxground.train.loop import config_json
    from jaxground.train.state import PathFilter, init_state
    from jaxground.train.task import data_config, model_config

    root = tmp_path_factory.mktemp("trained")
    config = load_config("configs/tiny_shapes_stage3.py", [*TINY, f"data.tokenizer={llama_tokenizer(root / 'tok')}"])
    cfg = model_config(config, make_encoder(data_config(config, training=True))[1])
    model = random_model(cfg)
    ck = checkpoint.Checkpointer(root / "run" / "checkpoints", save_every=1, keep=1, async_save=False)
    ck.save(7, init_state(nnx.state(model), optax.sgd(0.0), PathFilter([])), config=config_json(config), force=True)
    ck.close()
    assert main(["export", "--checkpoint", str(root / "run"), "--out", str(root / "torch")]) == 0
    return root, model, cfg


def test_training_checkpoint_exports_what_convert_reads_back(trained, tmp_path, capsys):
    from jaxground.convert.store import load_converted, stored_variables

    root, model, cfg = trained
    assert main(["convert", str(root / "torch"), "--out", str(tmp_path / "back")]) == 0
    back, back_cfg = load_converted(tmp_path / "back")
    ours = {p: np.asarray(v.get_value()) for p, v in stored_variables(model).items() if not p.startswith(AIDS)}
    theirs = {p: np.asarray(v.get_value()) for p, v in stored_variables(back).items()}
    assert sorted(theirs) == sorted(ours)  # everything but the training aids, which the release has no place for
    for path, array in ours.items():
        assert theirs[path].dtype == array.dtype and np.array_equal(theirs[path], array), path
    # config.json and the weights carry the model: the same LLM, tower, projector, token ids and SAM come back
    assert (back_cfg.llm, back_cfg.vision, back_cfg.projector, back_cfg.tokens, back_cfg.sam) == \
           (cfg.llm, cfg.vision, cfg.projector, cfg.tokens, cfg.sam)
    # without the `jaxground` entry (a config.json of the release's kind) the tower's size cannot be read
    torch_dir = tmp_path / "no_entry"
    shutil.copytree(root / "torch", torch_dir)
    config = json.loads((torch_dir / "config.json").read_text())
    del config["jaxground"]
    (torch_dir / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(torch_dir), "--out", str(tmp_path / "back2")]) == 2
    assert "has no position table" in capsys.readouterr().err


def test_exported_directory_loads_into_the_official_classes(trained, tmp_path):
    from transformers import AutoTokenizer

    from jaxground.tokens import SPECIAL_TOKENS

    root, model, cfg = trained
    out = root / "torch"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["NextChatForSegLM"] and config["mm_vision_select_layer"] == -2
    ref, info = official.load(out, cfg.sam)
    saved = load_file(str(out / "model.safetensors"))
    assert not info["missing_keys"]
    # the official classes build no vision tower: the loader takes it from its `vision_tower` argument
    assert {k.split(".vision_model.")[0] for k in info["unexpected_keys"]} == {"model.vision_tower"}
    for key, tensor in ref.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    projector = ref.model.mm_projector  # built from config.json, filled with our weights (not random)
    np.testing.assert_array_equal(projector[0].weight.detach().numpy(), np.asarray(model.projector.fc1.kernel[...]).T)
    np.testing.assert_array_equal(projector[2].weight.detach().numpy(), np.asarray(model.projector.fc2.kernel[...]).T)
    # the mechanism: without `use_mm_proj` the official __init__ builds no projector and drops the saved one
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "use_mm_proj"}))
    without, info = official.load(bare, cfg.sam)
    assert not hasattr(without.model, "mm_projector") and "model.mm_projector.0.weight" in info["unexpected_keys"]
    # the tokenizer already holds the NExT-Chat tokens at the model's ids: initialize_vision_tokenizer adds none
    tok = AutoTokenizer.from_pretrained(str(out), use_fast=False)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [getattr(cfg.tokens, f) for f in
                                                                ("im_patch", "im_start", "im_end", "at", "boxes")]
    assert len(tok) == config["vocab_size"] == cfg.llm.vocab_size
    assert json.loads((out / "added_tokens.json").read_text()) == dict(zip(SPECIAL_TOKENS, range(60, 65)))


def test_missing_tokenizer_is_one_line_naming_the_option(trained, tmp_path, capsys):
    root, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    meta = run / "checkpoints" / "7" / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    saved["config"]["data"]["tokenizer"] = str(tmp_path / "gone")
    meta.write_text(json.dumps(saved))
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tokenizer" in err and len(err.splitlines()) == 1
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "out"), "--tokenizer",
                 str(root / "tok")]) == 0


def test_scanned_layers_export_under_per_layer_names(trained):
    """A scanned LLM (the 7B configs) stacks each layer kind into one array: its rows get the per-layer names."""
    from flax import nnx

    from jaxground.convert.nextchat import released_layout
    from jaxground.convert.store import model_factory, stored_variables

    _, _, cfg = trained

    def layout(c):
        variables = stored_variables(nnx.eval_shape(model_factory("nextchat", c)))
        return released_layout(c, {p: (tuple(v.get_value().shape), "float32") for p, v in variables.items()})

    flat = {e["key"]: e for e in layout(cfg)}
    scanned_cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, scan_layers=True))
    scanned = {e["key"]: e for e in layout(scanned_cfg)}
    assert sorted(scanned) == sorted(flat)
    q1 = scanned["model.layers.1.self_attn.q_proj.weight"]
    assert (q1["path"], q1["index"], q1["shape"]) == ("llm.layers.q.kernel", 1, flat[q1["key"]]["shape"])
