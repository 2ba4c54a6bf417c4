"""`jaxground eval` and `jaxground predict` end to end: a tiny random NextChat with a tiny SAM (nothing trained)
saved as `jaxground train` saves checkpoints and as `jaxground convert` writes its output, a tiny synthetic
shapes set, every task the shapes support (and Visual7W pointing on records made from them)."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxground import cli

SAM = ("model.sam.img_size=32", "model.sam.patch_size=8", "model.sam.width=32", "model.sam.depth=1",
       "model.sam.num_heads=2", "model.sam.window_size=2", "model.sam.global_attn_indexes=(0,)",
       "model.sam.prompt_dim=16", "model.sam.mask_in_chans=4", "model.sam.decoder_depth=1",
       "model.sam.decoder_heads=2", "model.sam.decoder_mlp_dim=32", "model.sam.iou_head_hidden_dim=16")


def overrides(data_dir):
    return [
        f"paths.shapes={data_dir}", "data.image_size=32", "data.num_image_tokens=16", "data.max_len=64",
        "data.mask_size=16", "data.sam_size=32",
        "model.vision.image_size=32", "model.vision.hidden_size=32", "model.vision.intermediate_size=64",
        "model.vision.num_layers=1", "model.vision.num_heads=2",
        "model.llm.hidden_size=32", "model.llm.intermediate_size=64", "model.llm.num_layers=1",
        "model.llm.num_heads=2", "model.llm.num_kv_heads=2", "model.llm.max_position=96",
        "eval.batch_size=4", "eval.max_new_tokens=6", "eval.meteor=False", *SAM,
    ]


def build_model(config):
    """A random NextChat whose greedy answer starts with a trigger: every token embedding gets a large first
    coordinate, the final norm keeps only that coordinate, and the LM head reads it into `<at>` alone."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxground.data.pipeline import make_encoder
    from jaxground.models.nextchat import NextChat
    from jaxground.train.task import data_config, model_config

    _, tokens = make_encoder(data_config(config, training=True))
    model = NextChat(model_config(config, tokens), rngs=nnx.Rngs(0))
    llm = model.llm
    llm.embed_tokens.embedding[...] = llm.embed_tokens.embedding[...].at[:, 0].add(50.0)
    llm.norm.scale[...] = jnp.zeros_like(llm.norm.scale[...]).at[0].set(1.0)
    llm.lm_head.kernel[...] = jnp.zeros_like(llm.lm_head.kernel[...]).at[0, tokens.at].set(1.0)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import jax
    import optax
    from flax import nnx

    from jaxground import checkpoint
    from jaxground.config import load_config
    from jaxground.convert.store import StoreWriter, stored_variables
    from jaxground.data.shapes import write_dataset
    from jaxground.train.state import PathFilter, init_state

    root = tmp_path_factory.mktemp("e2e")
    write_dataset(root / "shapes", train=8, val=1, test=2, size=32, max_objects=2)
    args = overrides(root / "shapes")
    config = load_config("configs/eval_shapes.py", args)
    model = build_model(config)
    # as `jaxground train` saves: Orbax manager under WORKDIR/checkpoints/<step>
    state = init_state(nnx.state(model), optax.sgd(0.0), PathFilter([]))
    ck = checkpoint.Checkpointer(root / "run" / "checkpoints", save_every=1, keep=1, async_save=False)
    ck.save(1, state, config=config.to_dict(), force=True)
    ck.close()
    # as `jaxground convert` writes: the converted store
    with StoreWriter(root / "converted") as writer:
        for path, var in stored_variables(model).items():
            writer.add(path, np.asarray(jax.device_get(var.get_value())))
        writer.commit("nextchat", model.cfg, [])
    return root, args


def expected_counts(data_dir):
    from jaxground.data.records import RecordSource

    src = RecordSource([data_dir / "test.array_record"])
    examples = [src[i] for i in range(len(src))]
    return {t: sum(len(ex.tasks[t]) for ex in examples) for t in ("rec", "pope")}


def test_eval_every_shapes_task(setup, capsys):
    root, args = setup
    counts = expected_counts(root / "shapes")
    out = root / "eval_run"
    code = cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                     "--out", str(out), "--tasks", "rec,rec_gen,res,pope,reg", *args])
    assert code == 0, capsys.readouterr().err
    figures = json.loads((out / "eval.json").read_text())
    assert set(figures) == {"rec", "rec_gen", "res", "pope", "reg"}
    f = {task: figures[task]["shapes_test"] for task in figures}
    for task in ("rec", "rec_gen"):
        assert f[task]["count"] == counts["rec"] and 0 <= f[task]["acc@0.5"] <= 1 and 0 <= f[task]["miou"] <= 1
    assert f["rec_gen"]["no_trigger"] == 0  # the rigged head always answers with a trigger first
    assert f["res"]["count"] == counts["rec"] and 0 <= f["res"]["ciou"] <= 1 and 0 <= f["res"]["giou"] <= 1
    assert f["pope"]["count"] == counts["pope"]
    assert f["pope"]["yes_ratio"] == 0.0 and f["pope"]["accuracy"] == pytest.approx(0.5)  # balanced; never "yes"
    assert f["reg"]["count"] == counts["rec"] and f["reg"]["cider"] >= 0 and "meteor" not in f["reg"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    per_task = {t: [r for r in rows if r["task"] == t] for t in figures}
    assert {t: len(r) for t, r in per_task.items()} == {t: figures[t]["shapes_test"]["count"] for t in figures}
    assert all(r["pred"] is not None for r in per_task["rec_gen"])

    # the converted checkpoint of the same weights gives the same figures
    out2 = root / "eval_converted"
    assert cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "converted"),
                     "--out", str(out2), "--tasks", "rec", *args]) == 0
    assert json.loads((out2 / "eval.json").read_text())["rec"] == figures["rec"]


def test_eval_bad_task_and_no_mask_head(setup, capsys):
    root, args = setup
    assert cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                     "--tasks", "rec,nope", *args]) == 2
    assert "unknown eval tasks ['nope']" in capsys.readouterr().err


def test_predict_draws_boxes_and_masks(setup, capsys):
    from jaxground.infer.predict import rle_decode

    root, args = setup
    image = np.zeros((24, 40, 3), np.uint8)
    image[4:20, 8:30] = (200, 40, 40)
    path = root / "img.png"
    Image.fromarray(image).save(path)
    for ckpt in ("run", "converted"):
        png = root / f"pred_{ckpt}.png"
        code = cli.main(["predict", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / ckpt),
                         "--image", str(path), "--prompt", "what is [0]?", "--box", "8,4,30,20",
                         "--max-new-tokens", "4", "--out", str(png), "--json", *args])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        answer = json.loads(captured.out)
        objects = answer["objects"]
        assert objects and answer["answer"].startswith("[1]")
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 <= x1 <= 40 and 0 <= y0 <= y1 <= 24
            mask = rle_decode(o["mask_rle"])
            assert mask.shape == (24, 40) and mask.sum() == o["mask_area"]
        with Image.open(png) as im:
            assert im.size == (40, 24)
