"""`jaxground eval` and `jaxground predict` end to end: a tiny random NextChat with a tiny SAM (nothing trained)
saved as `jaxground train` saves checkpoints and as `jaxground convert` writes its output, a tiny synthetic
shapes set, every task the shapes support (and Visual7W pointing on records made from them)."""

import json
import re

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
        "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",  # the 8 simulated devices of tests/conftest.py
    ]


def build_model(config, rigged=True, std=0.05):
    """A random NextChat (weights drawn in NumPy: eager initialisers compile once per shape, ~40 s here); rigged,
    its greedy answer starts with a trigger: every token embedding gets a large first coordinate, the final norm
    keeps only that coordinate, and the LM head reads it into `<at>` alone."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxground.data.pipeline import make_encoder
    from jaxground.models.nextchat import NextChat
    from jaxground.train.task import data_config, model_config

    _, tokens = make_encoder(data_config(config, training=True))
    cfg = model_config(config, tokens)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NextChat(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        value = rng.normal(0.0, std, x.shape).astype(x.dtype)
        if "scale" in name:  # norms start at one, as initialised
            value = np.ones(x.shape, x.dtype)
        if not rigged:
            return jnp.asarray(value)
        if name.startswith("['llm']['embed_tokens']"):
            value[:, 0] += 50.0
        elif name.startswith("['llm']['norm']"):
            value = np.eye(1, x.shape[0], dtype=x.dtype)[0]
        elif name.startswith("['llm']['lm_head']"):
            value = np.zeros(x.shape, x.dtype)
            value[0, tokens.at] = 1.0
        return jnp.asarray(value)

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))
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
    return root, args, model


def expected_counts(data_dir):
    from jaxground.data.records import RecordSource

    src = RecordSource([data_dir / "test.array_record"])
    examples = [src[i] for i in range(len(src))]
    counts = {t: sum(len(ex.tasks[t]) for ex in examples) for t in ("rec", "pope", "count")}
    counts["count_labels"] = sorted(len(it["objs"]) for ex in examples for it in ex.tasks["count"])
    return counts


def rows_of(out, task):
    return [r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines()) if r["task"] == task]


def test_eval_every_shapes_task(setup, capsys):
    root, args, _ = setup
    counts = expected_counts(root / "shapes")
    out = root / "eval_run"
    code = cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                     "--out", str(out), "--tasks", "rec,rec_gen,res,pope,reg,count", *args])
    assert code == 0, capsys.readouterr().err
    figures = json.loads((out / "eval.json").read_text())
    assert set(figures) == {"rec", "rec_gen", "res", "pope", "reg", "count"}
    f = {task: figures[task]["shapes_test"] for task in figures}
    for task in ("rec", "rec_gen"):
        assert f[task]["count"] == counts["rec"] and 0 <= f[task]["acc@0.5"] <= 1 and 0 <= f[task]["miou"] <= 1
    assert f["rec_gen"]["no_trigger"] == 0  # the rigged head always answers with a trigger first
    assert f["res"]["count"] == counts["rec"] and 0 <= f["res"]["ciou"] <= 1 and 0 <= f["res"]["giou"] <= 1
    assert f["pope"]["count"] == counts["pope"]
    assert f["pope"]["yes_ratio"] == 0.0 and f["pope"]["accuracy"] == pytest.approx(0.5)  # balanced; never "yes"
    assert f["count"]["count"] == counts["count"] and 0 <= f["count"]["accuracy"] <= 1
    # every reference answer, decoded from the tokenized conversation, gives back its item's number of objects
    assert sorted(r["label_count"] for r in rows_of(out, "count")) == counts["count_labels"]
    assert f["reg"]["count"] == counts["rec"] and f["reg"]["cider"] >= 0 and "meteor" not in f["reg"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    per_task = {t: [r for r in rows if r["task"] == t] for t in figures}
    assert {t: len(r) for t, r in per_task.items()} == {t: figures[t]["shapes_test"]["count"] for t in figures}
    assert all(r["pred"] is not None for r in per_task["rec_gen"])

    # the converted checkpoint of the same weights gives the same figures
    out2 = root / "eval_converted"
    assert cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "converted"),
                     "--out", str(out2), "--tasks", "rec", "--splits", "shapes_test", *args]) == 0
    assert json.loads((out2 / "eval.json").read_text())["rec"] == figures["rec"]


def test_eval_saves_each_split_and_resumes_after_a_crash(setup, capsys, monkeypatch):
    """A crash in the second task keeps the first's figures and rows (OUT/splits, eval.json so far); `--resume`
    evaluates only the rest and writes what one clean run writes, byte for byte; a saved split of another flag,
    config or code is refused, one of another mesh and batch size taken; with every split saved nothing is loaded."""
    from jaxground.eval import evaluate

    root, args, _ = setup
    clean, out = root / "resume_clean", root / "resume_crash"

    def run(*flags, more=()):
        return cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"), "--tasks",
                         "rec,pope", "--out", str(out), *flags, *args, *more])

    assert run("--out", str(clean)) == 0
    printed, shown = capsys.readouterr()
    assert re.search(r"eval rec/shapes_test: \d+ batches of 4 rows\n", shown)
    assert re.search(r"eval pope/shapes_test: done in [\d.]+s: \{\"accuracy\": 0.5, ", shown)
    figures = json.loads((clean / "eval.json").read_text())
    assert printed == json.dumps(figures) + "\n"  # progress on stderr: stdout is the figures alone

    real = evaluate.batch_generator

    def stopping_with(error):  # a batch generator whose step raises `error`
        def generator(*a, **k):
            real(*a, **k)
            return lambda batch: (_ for _ in ()).throw(error)
        return generator

    monkeypatch.setattr(evaluate, "batch_generator", stopping_with(RuntimeError("preempted")))
    with pytest.raises(RuntimeError, match="preempted"):
        run()
    assert "eval pope/shapes_test: done" not in capsys.readouterr().err
    monkeypatch.setattr(evaluate, "batch_generator", stopping_with(KeyboardInterrupt()))  # Ctrl-C: 130, the way on
    assert run("--resume") == 130
    assert f"interrupted; the splits that ended are saved in {out / 'splits'}: rerun the same command with --resume" \
        in capsys.readouterr().err
    assert json.loads((out / "eval.json").read_text()) == {"rec": figures["rec"]}
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["rec.shapes_test.json"]
    assert not (out / "predictions.jsonl").exists()

    monkeypatch.setattr(evaluate, "batch_generator", real)
    monkeypatch.setitem(evaluate._STEPS, "rec", None)  # rec must come from its saved split
    assert run("--resume") == 0
    assert "eval rec/" not in capsys.readouterr().err
    for name in ("eval.json", "predictions.jsonl"):
        assert (out / name).read_text() == (clean / name).read_text()

    for flags, more, key in ((["--max-new-tokens", "3"], [], "max_new_tokens"),
                             ([], ["eval.pope_parser=pope"], "config.eval.pope_parser")):
        assert run("--resume", *flags, more=more) == 2
        assert re.search(rf"splits/rec\.shapes_test\.json was evaluated with another {key}; drop --resume",
                         capsys.readouterr().err)
    with monkeypatch.context() as m:  # the jaxground code edited or upgraded between the runs
        m.setattr("jaxground.eval.saved.code_id", lambda: "0123456789abcdef")
        assert run("--resume") == 2
        assert "rec.shapes_test.json was evaluated with another code; drop --resume" in capsys.readouterr().err
    monkeypatch.setattr("jaxground.infer.command.load_model", None)  # every split saved: no model is loaded
    assert run("--resume", more=["mesh.fsdp=2", "mesh.tensor=4", "eval.batch_size=8"]) == 0
    assert (out / "eval.json").read_text() == (clean / "eval.json").read_text()


def test_eval_predictions_do_not_depend_on_the_batch_size(setup):
    """An unrigged random model answers every sample differently (its `<at>` logit scaled up so that some answers
    hold a trigger and some none): the rows at batch size 1 and at 3 (the last batch padded) must be equal, so a
    prediction paired with another sample's reference, or one changed by padding, fails."""
    import jax

    from jaxground.config import load_config
    from jaxground.eval.evaluate import evaluate
    from jaxground.infer.command import load_encoder
    from jaxground.parallel import make_mesh

    _, args, _ = setup
    config = load_config("configs/eval_shapes.py", args)
    encoder, tokens = load_encoder(config)
    model = build_model(config, rigged=False, std=0.3)
    kernel = model.llm.lm_head.kernel
    kernel.set_value(kernel.get_value().at[:, tokens.at].multiply(4.0))
    rows = {}
    for batch_size in (1, 3):
        config.eval.batch_size = batch_size
        rows[batch_size] = evaluate(model, encoder, config, ("rec", "rec_gen"), max_new_tokens=6,
                                    mesh=make_mesh((1, 1, 1), jax.devices()[:1]))[1]
    one, three = rows[1], rows[3]
    assert len(one) == len(three) and len(one) % 3  # a padded last batch
    generated = [r for r in one if r["task"] == "rec_gen"]
    assert len({r["answer"] for r in generated}) > len(generated) // 2  # answers differ between samples
    assert 0 < sum(r["pred"] is not None for r in generated) < len(generated)  # some with a trigger, some not
    for a, b in zip(one, three):
        assert {k: v for k, v in a.items() if k != "pred"} == {k: v for k, v in b.items() if k != "pred"}
        assert (a["pred"] is None) == (b["pred"] is None), (a, b)
        if a["pred"] is not None:
            np.testing.assert_allclose(a["pred"], b["pred"], atol=2e-4, err_msg=str(a))


def test_eval_bad_task_and_no_mask_head(setup, capsys):
    root, args, _ = setup
    assert cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                     "--tasks", "rec,nope", *args]) == 2
    assert "unknown eval tasks ['nope']" in capsys.readouterr().err
    # a task named twice ran twice until 2026-12-05, the second time over no rows, and eval.json kept its zeros
    assert cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                     "--tasks", "rec,rec", *args]) == 2
    assert "jaxground eval: eval tasks rec, rec: name each task once" in capsys.readouterr().err
    assert cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                     "--tasks", ",", *args]) == 2
    assert "jaxground eval: no eval task named (known: rec," in capsys.readouterr().err  # was "unknown eval tasks ()"
    assert cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                     "--splits", "shapes_val", *args]) == 2
    assert "--splits 'shapes_val': no split named shapes_val (the config's splits: shapes_test)" in capsys.readouterr().err
    (root / "a_file").write_text("")
    for out in (root / "a_file", root / "a_file" / "eval"):
        assert cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                         "--out", str(out), *args]) == 2
        assert f"--out: {root / 'a_file'} is a file, not a folder" in capsys.readouterr().err


def test_predict_draws_boxes_and_masks(setup, capsys):
    from jaxground.infer.predict import rle_decode

    root, args, _ = setup
    image = np.zeros((24, 40, 3), np.uint8)
    image[4:20, 8:30] = (200, 40, 40)
    path = root / "img.png"
    Image.fromarray(image).save(path)
    for ckpt in ("run",):  # loading a converted checkpoint is shared with eval (tested there)
        png = root / "drawn" / ckpt / "pred.png"  # folders that do not exist yet are made
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
            assert im.size == (280, 168)  # drawn 7 times larger: 256 px at least on the longer side


@pytest.mark.parametrize("extra", [["--max-new-tokens", "4"], ["--max-new-tokens", "5", "--max-triggers", "1"]])
def test_predict_numbers_only_objects_with_a_box(setup, capsys, extra):
    """The rigged model answers <at> <boxes> <pad> <at> <boxes> ...: an <at> as the last token (no <boxes> forced
    after it) or beyond --max-triggers has no box, so it is printed as [?], and every [k] has its object."""
    root, args, _ = setup
    path = root / "img.png"
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(path)
    code = cli.main(["predict", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                     "--image", str(path), "--prompt", "what is [0]?", "--box", "8,4,30,20", "--json", *extra, *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    answer = json.loads(captured.out)
    assert answer["answer"] == "[1] [?]"
    assert [o["ref"] for o in answer["objects"]] == [1]


@pytest.mark.parametrize("fill", ["mean", "white"])
def test_predict_pads_with_the_configs_fill(setup, capsys, monkeypatch, fill):
    """The CLIP image is padded square in `data.pad_fill`, as the model was trained (white for released weights)."""
    from jaxground.data import transforms

    root, args, _ = setup
    path = root / "wide.png"
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(path)
    fills = []
    real = transforms.clip_image
    monkeypatch.setattr(transforms, "clip_image", lambda im, size, f="mean": fills.append(f) or real(im, size, f))
    code = cli.main(["predict", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                     "--image", str(path), "--prompt", "what is it?", "--max-new-tokens", "2", *args,
                     f"data.pad_fill={fill}"])
    assert code == 0, capsys.readouterr().err
    assert fills == [fill]


def test_predict_list_answers_every_line_with_one_load(setup, capsys):
    root, args, _ = setup
    paths = []
    for i, colour in enumerate([(200, 40, 40), (40, 200, 40)]):
        image = np.zeros((24 + 8 * i, 40, 3), np.uint8)
        image[4:20, 8:30] = colour
        paths.append(root / f"list{i}.png")
        Image.fromarray(image).save(paths[-1])
    tsv = root / "requests.tsv"
    tsv.write_text(f"{paths[0]}\twhat is [0]?\t{root / 'list_pred0.png'}\t8,4,30,20\n\n"
                   f"{paths[1]}\twhere is the shape?\n")
    code = cli.main(["predict", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"),
                     "--list", str(tsv), "--max-new-tokens", "4", "--json", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    answers = [json.loads(line) for line in captured.out.splitlines()]
    assert [a["image"] for a in answers] == [str(p) for p in paths]
    assert answers[0]["answer"].startswith("[1]")  # its one input box is [0]
    for a, h in zip(answers, (24, 32)):
        assert all(0 <= o["box"][1] <= o["box"][3] <= h for o in a["objects"])
    with Image.open(root / "list_pred0.png") as im:
        assert im.size == (280, 168)
    assert not (root / "list_pred1.png").exists()


def test_predict_list_refuses_a_long_prompt_before_the_model_loads(setup, capsys):
    """The checkpoint does not exist, so only a check made before loading it can name the line."""
    root, args, _ = setup
    path = root / "img.png"
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(path)
    tsv = root / "long.tsv"
    tsv.write_text(f"{path}\twhat is it?\n{path}\t{'what is it? ' * 40}\n")
    code = cli.main(["predict", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "no_such_run"),
                     "--list", str(tsv), "--max-new-tokens", "4", *args])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert re.search(rf"{re.escape(str(tsv))}:2: prompt of \d+ tokens \+ max_new_tokens 4 exceeds the model's "
                     r"context of 96 tokens", captured.err), captured.err


def test_eval_visual7w_pointing_on_records(setup, capsys):
    """Visual7W pointing on records built from the shapes test images: every object is a candidate."""
    import dataclasses
    import shutil

    from jaxground.data.records import RecordSource, write_records

    root, args, _ = setup
    src = RecordSource([root / "shapes" / "test.array_record"])
    examples = [src[i] for i in range(len(src))]
    items = [{"question": "Which one is the shape?", "candidates": list(range(len(ex.boxes))), "answer": 0}
             for ex in examples]
    data = root / "v7w"
    shutil.copytree(root / "shapes" / "tokenizer", data / "tokenizer")
    write_records(data / "test.array_record",
                  [dataclasses.replace(ex, tasks={"v7w": [item]}) for ex, item in zip(examples, items)])
    out = root / "eval_v7w"
    assert cli.main(["eval", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"), "--out",
                     str(out), "--tasks", "v7w", *args, f"paths.shapes={data}"]) == 0, capsys.readouterr().err
    f = json.loads((out / "eval.json").read_text())["v7w"]["shapes_test"]
    assert f["count"] == len(examples) and 0 <= f["accuracy"] <= 1
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [0] * len(examples)
    assert all(0 <= r["choice"] < len(ex.boxes) for r, ex in zip(rows, examples))


def test_init_from_accepts_training_and_converted_checkpoints(setup):
    """`train --init-from` (checkpoint.load_model) reads a `jaxground convert` output like a training checkpoint:
    the same arrays, placed in the requested shardings, with `fresh` parts allowed to be absent."""
    import jax
    from flax import nnx

    from jaxground import checkpoint

    root, _, model = setup
    abstract = nnx.state(nnx.eval_shape(lambda: model))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
    from_run = dict(nnx.to_flat_state(checkpoint.load_model(root / "run", abstract, shardings)))
    from_conv = dict(nnx.to_flat_state(checkpoint.load_model(root / "converted", abstract, shardings)))
    assert from_run.keys() == from_conv.keys() and len(from_run) > 10
    for k, v in from_run.items():
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(from_conv[k].get_value()))
    partial = dict(nnx.to_flat_state(checkpoint.load_model(root / "converted", abstract, shardings,
                                                           fresh=("mask_head",))))
    assert partial.keys() == from_conv.keys()  # present parts still load when they may be fresh


def test_init_from_converted_under_the_training_mesh_and_a_relative_path(setup, monkeypatch):
    """As the training loop calls it: inside `jax.set_mesh`, NamedShardings, the path relative to the cwd."""
    import jax
    from flax import nnx

    from jaxground import checkpoint
    from jaxground.parallel import make_mesh, state_shardings

    root, _, model = setup
    mesh = make_mesh((1, -1, 1))
    abstract = nnx.state(nnx.eval_shape(lambda: model))
    monkeypatch.chdir(root)
    with jax.set_mesh(mesh):
        loaded = dict(nnx.to_flat_state(checkpoint.load_model("converted", abstract, state_shardings(abstract, mesh))))
    want = dict(nnx.to_flat_state(nnx.state(model)))
    assert loaded.keys() == want.keys()
    for k, v in loaded.items():
        assert v.get_value().sharding.mesh == mesh
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(want[k].get_value()))


def test_init_from_several_sources_merged_in_order(setup, tmp_path):
    """Stage 3 from a run without SAM plus a conversion that has it: each source fills what it holds, a later
    one wins on overlap, and what none holds outside `fresh` is refused by name."""
    import dataclasses

    import jax
    from flax import nnx

    from jaxground import checkpoint
    from jaxground.convert.store import StoreWriter

    root, _, model = setup
    want = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}
    no_sam = [k for k in want if not any(k[0] == p for p in ("sam", "mask_head"))]
    assert len(no_sam) < len(want)
    # a "run" without SAM: the rest of the model, every float array shifted by 1
    with StoreWriter(tmp_path / "no_sam") as writer:
        for k in no_sam:
            writer.add(".".join(map(str, k)), want[k] + 1 if want[k].dtype.kind == "f" else want[k])
        writer.commit("nextchat", dataclasses.replace(model.cfg, sam=None), [])
    abstract = nnx.state(nnx.eval_shape(lambda: model))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
    with pytest.raises(checkpoint.CheckpointMismatch, match="together lack"):
        checkpoint.load_models([tmp_path / "no_sam", tmp_path / "no_sam"], abstract, shardings)
    merged = dict(nnx.to_flat_state(checkpoint.load_models([root / "converted", tmp_path / "no_sam"], abstract,
                                                           shardings)))
    assert merged.keys() == want.keys()
    for k, v in merged.items():
        shift = 1 if k in no_sam and want[k].dtype.kind == "f" else 0
        np.testing.assert_array_equal(np.asarray(v.get_value()), want[k] + shift, err_msg=str(k))
    partial = checkpoint.load_models([tmp_path / "no_sam", tmp_path / "no_sam"], abstract, shardings,
                                     fresh=("sam", "mask_head"))
    assert len(nnx.to_flat_state(partial)) == len(no_sam)
    # the other way round (stage 1 from a conversion composed with SAM): what the model lacks is skipped
    from jaxground.convert.store import model_factory

    smaller = nnx.state(nnx.eval_shape(model_factory("nextchat", dataclasses.replace(model.cfg, sam=None))))
    loaded = dict(nnx.to_flat_state(checkpoint.load_models([root / "converted"], smaller,
                                                           jax.tree.map(lambda _: device, smaller))))
    assert sorted(loaded) == sorted(no_sam)


def test_predict_trigger_state_and_mask_iou_threshold(setup, capsys, monkeypatch):
    """--trigger-state predicting (the released demo's reading) records every generated <at>, the last token's
    too, so the rigged answer of test_predict_numbers_only_objects_with_a_box gets a second object;
    --mask-iou-threshold blanks exactly the masks whose predicted IoU is below it, and by default none, a negative
    IoU's too (the rigged model's own masks are empty, so a stub mask head gives full masks with IoU -0.05, 0.05,
    ... per slot)."""
    from jaxground.infer import predict

    root, args, _ = setup
    path = root / "img.png"
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(path)
    base = ["predict", "--config", "configs/eval_shapes.py", "--checkpoint", str(root / "run"), "--image", str(path),
            "--prompt", "what is [0]?", "--box", "8,4,30,20", "--json", "--max-new-tokens", "4"]

    def answer(*extra):
        code = cli.main(base + list(extra) + args)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)

    assert answer()["answer"] == "[1] [?]"
    predicting = answer("--trigger-state", "predicting")
    assert predicting["answer"] == "[1] [2]" and [o["ref"] for o in predicting["objects"]] == [1, 2]

    def stub(model, image):
        def fn(states, boxes):
            q = states.shape[1]
            return np.ones((1, q, *image.shape[:2]), bool), 0.1 * np.arange(q, dtype=np.float32)[None] - 0.05
        return fn
    monkeypatch.setattr(predict, "mask_function", stub)
    objects = answer("--trigger-state", "predicting")["objects"]
    assert [o["mask_iou"] for o in objects] == [-0.05, 0.05] and [o["mask_area"] for o in objects] == [24 * 40] * 2
    objects = answer("--trigger-state", "predicting", "--mask-iou-threshold", "0")["objects"]
    assert [o["mask_area"] for o in objects] == [0, 24 * 40]
    assert cli.main(base + ["--trigger-state", "before"] + args) == 2
    assert "trigger_state must be one of" in capsys.readouterr().err
