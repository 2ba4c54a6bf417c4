"""Run configs: every shipped config loads and builds its model config; bad configs fail before training with
an error naming the problem; the CLI routes every command and refuses unknown ones."""

import importlib
import re
from pathlib import Path

import pytest

from jaxground import cli
from jaxground.config import ConfigError, load_config
from jaxground.data.shapes import write_dataset
from jaxground.models.sam.config import SamConfig
from jaxground.tokens import TokenIds
from jaxground.train.task import data_config, model_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("[!_]*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds(path):
    c = load_config(path)
    tokens = TokenIds() if c.model.llm.vocab_size > 0 else TokenIds.after(500)
    m = model_config(c, tokens)
    assert c.train.stage in (1, 2, 3) and c.train.batch_size % c.train.micro_steps == 0
    if c.train.stage == 3:
        # only the mask head trains, plus SAM's image encoder where the config unfreezes it (tiny default)
        allowed = ("mask_head",) + (() if c.model.get("freeze_sam", True) else ("^sam/",))
        assert c.train.trainable and all(any(a in p for a in allowed) for p in c.train.trainable)
        SamConfig(**c.model.sam.to_dict())
    else:
        assert "^vision/" in c.train.frozen or not c.model.freeze_vision
    if "7b" in path.stem:
        assert (m.llm.hidden_size, m.llm.num_layers, m.vision.image_size) == (4096, 32, 336)


def test_paper_settings():
    s1, s2, _ = (load_config(f"configs/nextchat_7b_stage{i}.py") for i in (1, 2, 3))
    assert (s1.train.batch_size, s1.optim.lr, s1.optim.warmup_ratio) == (128, 2e-5, 0.03)
    assert (s2.train.batch_size, s2.optim.lr) == (64, 2e-6)
    assert load_config("configs/nextchat_13b_stage1.py").model.llm.hidden_size == 5120
    assert "shapes" not in s1.data.datasets and "refcoco" in s1.data.datasets  # not merged with the default


def test_tiny_default_trains_rec_and_can_score_single_object_scenes():
    c = load_config("configs/tiny_shapes.py", ["eval.max_objects=1"])
    assert dict(c.data.task_weights) == {"rec": 1.0}
    train, held_out = data_config(c, training=True), data_config(c, training=False)
    assert (train.max_objects, held_out.max_objects) == (0, 1)
    # the patch aid's targets follow the model's patch size, in training only; stage 3 turns the aid off
    assert (train.patch_targets, held_out.patch_targets) == (c.model.vision.patch_size, 0)
    assert data_config(load_config("configs/tiny_shapes_stage3.py"), training=True).patch_targets == 0
    # likewise the attribute aid's labels
    assert (train.patch_attributes, held_out.patch_attributes) == (c.model.vision.patch_size, 0)
    assert data_config(load_config("configs/tiny_shapes_stage3.py"), training=True).patch_attributes == 0
    assert held_out.datasets.shapes.split == "test"


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_config("configs/tiny_shapes.py", ["train.stepz=3"])


def test_overrides_may_sit_between_options(tmp_path, capsys):
    """Overrides before and after an option both reach the config (argparse refused the second group as
    "unrecognized arguments" until 2026-12-05)."""
    assert cli.main(["train", "--config", "configs/tiny_shapes.py", "train.steps=1", "--workdir", str(tmp_path),
                     "train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().out


def test_a_key_the_commands_set_is_refused():
    """data.batch_size is replaced by train.batch_size / eval.batch_size per host: an override would do nothing."""
    with pytest.raises(ConfigError, match="data.batch_size cannot be overridden: .*train.batch_size"):
        load_config("configs/tiny_shapes.py", ["data.batch_size=8"])


def test_config_files_that_fail_are_one_line_naming_the_line(tmp_path):
    """A config file's syntax error, an exception in its code, or a get_config() returning something else: one
    ConfigError with file and line (they were tracebacks, or an AttributeError far from the file)."""
    for body, message in (("def get_config(:\n", r"bad.py:1: invalid syntax"),
                          ("def get_config():\n    x = 1\n    return x / 0\n", r"bad.py:3: ZeroDivisionError: "),
                          ("def get_config():\n    return 3\n", r"bad.py: get_config\(\) returned int, not an ")):
        (tmp_path / "bad.py").write_text(body)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / "bad.py")


def test_a_bool_for_a_number_is_refused():
    """ml_collections takes True for an int field (`step 1/True` in the progress line, `true` in the saved config)."""
    with pytest.raises(ConfigError, match=r"config key 'train.steps' is a number \(\d+\), got True"):
        load_config("configs/tiny_shapes.py", ["train.steps=True"])
    assert load_config("configs/tiny_shapes.py", ["train.steps=5"]).train.steps == 5


def test_bad_configs_fail_before_training(tmp_path, capsys, shapes_dir):
    args = ["train", "--config", "configs/tiny_shapes.py", "--workdir", str(tmp_path),
            f"data.tokenizer={shapes_dir}/tokenizer"]
    assert cli.main(args + ["data.datasets.shapes.kind=nosuch"]) == 2
    assert "unknown dataset kind 'nosuch'; known: flickr, llava, pope, records," in capsys.readouterr().out
    # without data.tokenizer the tokenizer is the shapes set's: the misspelt kind is still what is reported
    assert cli.main(args[:5] + ["data.datasets.shapes.kind=nosuch"]) == 2
    assert "unknown dataset kind 'nosuch'" in capsys.readouterr().out
    assert cli.main(args + [f"data.datasets.shapes.path={tmp_path}/none"]) == 2
    assert "not found" in capsys.readouterr().out
    assert cli.main(args + ["train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().out
    assert not (tmp_path / "checkpoints").exists()
    ok_data = [f"data.datasets.shapes.path={shapes_dir}", f"eval.datasets.shapes.path={shapes_dir}"]
    other = tmp_path / "other"  # a shapes set of another seed: a tokenizer as large, other ids
    write_dataset(other, train=2, val=1, test=1, size=32, max_objects=1, seed=1)
    assert cli.main(args[:5] + [f"data.datasets.shapes.path={shapes_dir}", f"eval.datasets.shapes.path={other}"]) == 2
    assert "the evaluation split's tokenizer " in capsys.readouterr().out
    assert cli.main(args + ok_data + ["train.label_tokens=1"]) == 2  # a REC answer has more supervised tokens
    assert "supervised tokens, more than train.label_tokens=1" in capsys.readouterr().out
    assert cli.main(args + ok_data + ["train.label_tokens=-1"]) == 2
    assert "train.label_tokens must be >= 0" in capsys.readouterr().out
    assert cli.main(args + ok_data + ["loss.w_patch=1.0", "model.patch_head=False"]) == 2
    assert "loss.w_patch=1.0 needs model.patch_head=True" in capsys.readouterr().out
    assert cli.main(args + ok_data + ["loss.w_attr=1.0", "model.attr_classes=0"]) == 2
    assert "loss.w_attr=1.0 needs model.attr_classes > 0" in capsys.readouterr().out
    for key, value, valid in (("train.steps", "-5", ">= 0"), ("train.log_every", "0", ">= 1"),
                              ("optim.lr", "-1.0", ">= 0"), ("optim.b2", "1.0", r"in \[0, 1\)"),
                              ("optim.warmup_ratio", "1.5", r"in \[0, 1\]")):
        assert cli.main(args + ok_data + [f"{key}={value}"]) == 2
        line = capsys.readouterr().out
        assert re.fullmatch(rf"jaxground train: bad config: {re.escape(key)} must be {valid}, got \S+\n", line), line
    assert not any(tmp_path.glob("checkpoints/*"))
    (tmp_path / "a_file").write_text("")  # a workdir that is a file: one line, not NotADirectoryError's traceback
    for workdir in (tmp_path / "a_file", tmp_path / "a_file" / "run"):
        assert cli.main([*args[:4], str(workdir), *args[5:], *ok_data]) == 2
        assert f"--workdir: {tmp_path / 'a_file'} is a file, not a folder" in capsys.readouterr().out


def test_mesh_not_dividing_is_refused(tmp_path, capsys, shapes_dir):
    base = ["train", "--config", "configs/tiny_shapes.py", "--workdir", str(tmp_path),
            f"data.datasets.shapes.path={shapes_dir}", f"eval.datasets.shapes.path={shapes_dir}"]
    assert cli.main(base + ["mesh.fsdp=3"]) == 2
    assert "needs 3 devices, have 8" in capsys.readouterr().out
    assert cli.main(base + ["mesh.fsdp=-1", "mesh.tensor=3"]) == 2
    assert "does not divide 8 devices" in capsys.readouterr().out
    assert cli.main(base + ["train.batch_size=12"]) == 2
    assert "batch 12 does not divide" in capsys.readouterr().out
    assert not any(tmp_path.glob("checkpoints/*"))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from jaxground.data.shapes import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, train=24, val=4, test=8, size=32, max_objects=2)
    return out


def test_cli_routes_every_command_and_refuses_unknown_ones(capsys):
    modules = [m for name, (m, _) in cli.COMMANDS.items() if name != "bench"]
    modules += [f"jaxground.bench.{name}" for name in cli._bench_names()]
    for module in map(importlib.import_module, modules):  # each imports and has both entry points
        assert callable(module.add_arguments) and callable(module.run), module.__name__
    assert cli.main(["--help"]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["nosuch"])
    assert e.value.code == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err
    assert cli.main(["bench", "nosuch"]) == 2
    assert "benchmarks: convert, forward, generate, pipeline, plan, sam, train" in capsys.readouterr().out


@pytest.mark.parametrize("argv, module, prog", [
    (["data", "shapes", "--out", "x"], "jaxground.data.command", "jaxground data"),
    (["convert", "a.pth", "--out", "x"], "jaxground.convert.command", "jaxground convert"),
    (["bench", "plan"], "jaxground.bench.plan", "jaxground bench plan"),
])
def test_ctrl_c_in_a_command_is_one_line_and_exit_130(capsys, monkeypatch, argv, module, prog):
    """Commands without work to keep (train, eval and predict report what they kept) stop on Ctrl-C with one line
    instead of KeyboardInterrupt's traceback."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), "run", interrupted)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err == f"{prog}: interrupted\n"
