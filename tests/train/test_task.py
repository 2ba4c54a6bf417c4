"""`jaxground train` end to end on a tiny NextChat and a tiny synthetic shapes set: the loss goes down, REC is
evaluated on the held-out split, and stage masks keep the frozen tower bit-identical."""

import json
import os
import shutil

import numpy as np
import pytest

from jaxground import cli


def tiny(shapes_dir, *extra):
    return [
        f"data.datasets.shapes.path={shapes_dir}", f"eval.datasets.shapes.path={shapes_dir}",
        "data.image_size=32", "data.num_image_tokens=16", "data.max_len=64",
        "model.vision.image_size=32", "model.vision.hidden_size=32", "model.vision.intermediate_size=64",
        "model.vision.num_layers=1", "model.vision.num_heads=2",
        "model.llm.hidden_size=32", "model.llm.intermediate_size=64", "model.llm.num_layers=1",
        "model.llm.num_heads=2", "model.llm.num_kv_heads=2", "model.llm.max_position=64",
        "train.batch_size=8", "eval.batch_size=8", "train.log_every=1", "optim.lr=3e-3", "optim.warmup_ratio=0.0",
        *extra,
    ]


def test_tiny_nextchat_learns_and_evaluates(tmp_path, shapes_dir, capsys):
    code = cli.main(["train", "--config", "configs/tiny_shapes.py", "--workdir", str(tmp_path),
                     *tiny(shapes_dir, "train.steps=8", "mesh.fsdp=4", "mesh.tensor=2",
                          "train.label_tokens=16")])  # the LM head at supervised positions only
    out = capsys.readouterr().out
    assert code == 0, out
    assert "step 8/8 | " in out and " ce " in out and " giou " in out and "samples/s | ETA" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(loss) == 8 and np.mean(loss[-3:]) < np.mean(loss[:3]), loss
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["count"] == 12 and 0.0 <= figures["acc@0.5"] <= 1.0 and figures["step"] == 8
    assert any((tmp_path / "tb").iterdir())


def test_stage_mask_keeps_vision_tower_frozen(tmp_path, shapes_dir, capsys):
    import jax
    from flax import nnx

    from jaxground import checkpoint, parallel
    from jaxground.config import load_config
    from jaxground.train import state as st
    from jaxground.train.task import make_task

    overrides = tiny(shapes_dir, "train.steps=2", "train.save_every=1", "model.freeze_vision=True",
                     "train.frozen=('^vision/',)")
    assert cli.main(["train", "--config", "configs/tiny_shapes.py", "--workdir", str(tmp_path), *overrides]) == 0
    capsys.readouterr()
    config = load_config("configs/tiny_shapes.py", overrides)
    task = make_task(config)
    mesh = parallel.make_mesh((1, -1, 1))
    with jax.set_mesh(mesh):
        _, abstract, sh = st.plan(task.model_factory, st.make_optimizer(config.optim, 2), st.PathFilter([".*"]), mesh)
        step1, step2 = (checkpoint.load_model(tmp_path / "checkpoints" / str(i), abstract.model, sh.model)
                        for i in (1, 2))
    moved = {"vision": [], "other": []}
    for (path, a), (_, b) in zip(nnx.to_flat_state(step1), nnx.to_flat_state(step2)):
        same = np.array_equal(np.asarray(a[...]), np.asarray(b[...]))
        moved["vision" if path[0] == "vision" else "other"].append(not same)
    assert moved["vision"] and not any(moved["vision"])
    assert sum(moved["other"]) > 0.8 * len(moved["other"])

    # a copy of the run (TensorStore caches what it read from the original) with step 2's data files cut short:
    # refused naming it, for loading and for resuming
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "checkpoints", damaged / "checkpoints")
    for data in (damaged / "checkpoints" / "2").glob("model/ocdbt.process_*/d/*"):
        os.truncate(data, data.stat().st_size // 2)
    with jax.set_mesh(mesh), pytest.raises(checkpoint.CheckpointDamaged, match="damaged or incomplete"):
        checkpoint.load_model(damaged / "checkpoints" / "2", abstract.model, sh.model)
    assert cli.main(["train", "--config", "configs/tiny_shapes.py", "--workdir", str(damaged), *overrides]) == 2
    out = capsys.readouterr().out
    assert f"jaxground train: {damaged / 'checkpoints' / '2'}: its saved arrays cannot be read" in out, out

    # the run's tokenizer is saved with it by its vocabulary's hash: another shapes set's tokenizer (as many
    # tokens, other ids) is refused by predict, eval and export, where it ran with every id meaning another word
    from PIL import Image

    from jaxground.data.shapes import write_dataset

    write_dataset(tmp_path / "other", train=8, val=1, test=1, size=32, max_objects=1, seed=1)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img.png")
    other = f"data.tokenizer={tmp_path / 'other' / 'tokenizer'}"
    for argv in (["predict", "--image", str(tmp_path / "img.png"), "--prompt", "circle?", "--max-new-tokens", "4"],
                 ["eval", "--tasks", "rec", "--out", str(tmp_path / "ev")]):
        code = cli.main([argv[0], "--config", "configs/tiny_shapes.py", "--checkpoint", str(tmp_path), *argv[1:],
                         *overrides, other])
        err = capsys.readouterr().err
        assert code == 2 and "checkpoints/2 was trained with another tokenizer (vocabulary " in err, err
    assert cli.main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "ex"), "--tokenizer",
                     str(tmp_path / "other" / "tokenizer")]) == 2
    assert "was trained with another tokenizer" in capsys.readouterr().err
    for workdir, init in ((tmp_path, []), (tmp_path / "next", ["--init-from", str(tmp_path)])):  # resume, init
        assert cli.main(["train", "--config", "configs/tiny_shapes.py", "--workdir", str(workdir), *init,
                         *overrides, other, "train.steps=3"]) == 2
        assert "was trained with another tokenizer" in capsys.readouterr().out


def test_unreadable_eval_split_is_refused_before_training(tmp_path, shapes_dir, capsys):
    """The run ends with an evaluation: an eval.datasets path without a data set (or tokenizer) is refused at the
    start, not after the training (where it raised TokenizerError with a traceback)."""
    args = tiny(shapes_dir, "train.steps=2", f"eval.datasets.shapes.path={tmp_path / 'nowhere'}")
    assert cli.main(["train", "--config", "configs/tiny_shapes.py", "--workdir", str(tmp_path / "run"), *args]) == 2
    out = capsys.readouterr().out
    assert out.startswith("jaxground train: bad config: the evaluation split (eval.datasets): "), out
    assert not (tmp_path / "run").exists()


def test_bucket_urls_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--config", "configs/tiny_shapes.py", "--workdir", "gs://bucket/run"]) == 2
    assert "mount it" in capsys.readouterr().out and not any(tmp_path.iterdir())


def test_stage_override_alone_is_refused():
    """`train.stage` does not pick the patterns; overriding it alone would train the configured set, refused at
    load for every config (the tiny ones carry their own patterns); check_stage catches a config file that
    names one stage with another's patterns."""
    import shlex

    from jaxground.config import ConfigError, load_config
    from jaxground.train.task import TaskConfigError, check_stage

    check_stage(load_config("configs/nextchat_7b_stage1.py", ["train.stage=2"]).train)  # the same set
    with pytest.raises(ConfigError, match="train.stage=3 overridden alone") as e:
        load_config("configs/nextchat_7b_stage1.py", ["train.stage=3"])
    suggested = shlex.split(str(e.value).split("also set ")[1].split(" (or")[0])
    check_stage(load_config("configs/nextchat_7b_stage1.py", ["train.stage=3", *suggested]).train)
    with pytest.raises(ConfigError, match=r"train.stage=1 overridden alone.*\^sam/"):
        load_config("configs/tiny_shapes_stage3.py", ["train.stage=1"])
    load_config("configs/tiny_shapes_stage3.py", ["train.stage=1", "train.trainable=('^mask_head/',)"])
    check_stage(load_config("configs/tiny_shapes_stage3.py").train)  # its own patterns (+ ^sam/)
    config = load_config("configs/nextchat_7b_stage1.py")
    config.train.stage = 3  # a config file naming stage 3 with stage 1's patterns
    with pytest.raises(TaskConfigError, match="train.stage=3 but .* stage 1's"):
        check_stage(config.train)


@pytest.mark.parametrize("override, message", [
    ("model.llm.dtype=foo", "LlamaConfig.dtype 'foo' is not a dtype"),
    ("model.llm.hidden_size=0", "LlamaConfig.hidden_size must be >= 1, got 0"),  # was ZeroDivisionError
    ("model.vision.patch_size=0", "ClipVisionConfig.patch_size must be >= 1, got 0"),
    ("model.projector=foo", "model.projector must be one of"),
    ("optim.decay=xyz", 'optim.decay must be "hf" or "all"'),
    ("eval.batch_size=0", "eval.batch_size must be >= 1"),  # was a traceback after the whole training
    ("data.seed=-1", "data.seed must be >= 0"),
    ("data.mask_size=0", "data.mask_size must be >= 1"),
    ("data.num_image_tokens=10", "must be the vision tower's image size 32 and patch count 16"),  # trained silently
    ("data.image_size=64", "data.image_size 64 and data.num_image_tokens 16 must be"),
])
def test_settings_that_failed_inside_training_are_refused_before_it(tmp_path, shapes_dir, capsys, override, message):
    args = tiny(shapes_dir, "train.steps=1", override)
    assert cli.main(["train", "--config", "configs/tiny_shapes.py", "--workdir", str(tmp_path / "run"), *args]) == 2
    out = capsys.readouterr().out
    assert out.startswith("jaxground train: bad config: ") and message in out, out
    assert not (tmp_path / "run").exists()


def test_no_usable_sample_is_one_line(tmp_path, shapes_dir, capsys):
    """Every sample too long for data.max_len: BadSample after 100 batches' worth of skips, in one line (exit 2),
    where it was a traceback."""
    args = tiny(shapes_dir, "train.steps=1", "data.max_len=8")
    assert cli.main(["train", "--config", "configs/tiny_shapes.py", "--workdir", str(tmp_path), *args]) == 2
    out = capsys.readouterr().out
    assert "jaxground train: no usable sample in the last " in out and "exceed max_len 8" in out, out
