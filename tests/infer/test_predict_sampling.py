"""`jaxground predict` decoding flags: greedy by default, `--num-beams` with `--beam-rules` (or `--demo-beams`),
`--sample` / `--demo-sampling` with `--temperature`, `--top-k`, `--top-p`, `--seed` (and with `--num-beams` > 1:
sampled beam search) reach `GenerationConfig` and the sampling key; the same seed gives the same answer;
contradictory or bad values are refused in one line before the checkpoint loads."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from PIL import Image

from jaxground.cli import main

sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
from test_end_to_end import build_model, overrides


@pytest.fixture(scope="module")
def config_args(tmp_path_factory):
    """Overrides of configs/eval_shapes.py for a tiny model without a mask head, its tokenizer from a tiny shapes
    set."""
    from jaxground.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("sampling")
    write_dataset(root / "shapes", train=2, val=1, test=1, size=32, max_objects=2)
    return [a for a in overrides(root / "shapes") if not a.startswith("model.sam.")]


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    return path


def predict_args(config_args, checkpoint, image, *extra):
    return ["predict", "--config", "configs/eval_shapes.py", "--checkpoint", str(checkpoint), "--image", str(image),
            "--prompt", "what is [0]?", "--box", "2,2,20,15", "--json", "--max-new-tokens", "6", *extra, *config_args]


def stub_load_model(monkeypatch, model) -> None:
    """`predict` loads `model` from a checkpoint that is not there (its identity, compared between hosts, stubbed)."""
    from jaxground import checkpoint
    from jaxground.infer import command

    monkeypatch.setattr(checkpoint, "identity", lambda path: "step 1")
    monkeypatch.setattr(command, "load_model", lambda *a, **kw: model)


@pytest.mark.parametrize("flags, want", [
    ([], {"method": "greedy"}),
    (["--num-beams", "3"], {"method": "beam", "num_beams": 3, "beam_rules": "hf"}),
    (["--num-beams", "3", "--beam-rules", "released"], {"method": "beam", "num_beams": 3, "beam_rules": "released"}),
    (["--demo-beams"], {"method": "beam", "num_beams": 5, "beam_rules": "released"}),
    (["--demo-beams", "--num-beams", "3"], {"method": "beam", "num_beams": 3, "beam_rules": "released"}),
    (["--demo-beams", "--beam-rules", "hf"], {"method": "beam", "num_beams": 5, "beam_rules": "hf"}),
    (["--sample"], {"method": "sample", "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0}),
    (["--demo-sampling"], {"method": "sample", "temperature": 0.8, "top_k": 5, "top_p": 0.7, "seed": 0}),
    (["--demo-sampling", "--top-k", "10", "--seed", "7"],
     {"method": "sample", "temperature": 0.8, "top_k": 10, "top_p": 0.7, "seed": 7}),
    (["--sample", "--temperature", "0.5", "--top-p", "0.9", "--seed", "3"],
     {"method": "sample", "temperature": 0.5, "top_k": 0, "top_p": 0.9, "seed": 3}),
    (["--sample", "--num-beams", "2"],
     {"method": "beam_sample", "num_beams": 2, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0,
      "beam_rules": "released"}),
    (["--demo-sampling", "--num-beams", "5", "--seed", "9"],
     {"method": "beam_sample", "num_beams": 5, "temperature": 0.8, "top_k": 5, "top_p": 0.7, "seed": 9,
      "beam_rules": "released"}),
    (["--demo-sampling", "--demo-beams", "--beam-rules", "released"],
     {"method": "beam_sample", "num_beams": 5, "temperature": 0.8, "top_k": 5, "top_p": 0.7, "seed": 0,
      "beam_rules": "released"}),
])
def test_flags_reach_generation_config(config_args, tmp_path, image_file, capsys, monkeypatch, flags, want):
    """The model load and prediction are stubbed: what the command hands `predict`, and what `--json` records."""
    from jaxground.infer import predict

    calls = []

    def fake_predict(model, encoder, image, prompt, boxes, cfg, *, rng=None, **kw):
        calls.append((cfg, rng))
        return predict.Prediction(text="it", boxes=np.zeros((0, 4), np.float32), first_ref=0, masks=None)

    stub_load_model(monkeypatch, SimpleNamespace(cfg=SimpleNamespace(sam=None)))
    monkeypatch.setattr(predict, "predict", fake_predict)
    code = main(predict_args(config_args, tmp_path, image_file, *flags))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["decoding"] == want
    (cfg, rng), = calls
    assert cfg.method == want["method"]
    assert cfg.num_beams == want.get("num_beams", 1)
    assert cfg.rules == want.get("beam_rules")
    for field, neutral in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)):
        assert getattr(cfg, field) == want.get(field, neutral), field
    if "seed" in want:
        np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(want["seed"])))
    else:
        assert rng is None  # greedy and beams draw nothing


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0.5"], "--temperature needs --sample"),
    (["--top-k", "5"], "--top-k needs --sample"),
    (["--seed", "1"], "--seed needs --sample"),
    (["--num-beams", "3", "--top-p", "0.5"], "--top-p needs --sample"),
    (["--demo-sampling", "--num-beams", "2", "--trigger-state", "predicting"], "not beam search"),
    (["--demo-sampling", "--num-beams", "2", "--temperature", "-1"], "--temperature must be a finite number > 0"),
    (["--sample", "--temperature", "0"], r"--temperature must be a finite number > 0, got 0.0"),
    (["--sample", "--temperature", "nan"], "--temperature must be a finite number > 0"),
    (["--sample", "--top-k", "-1"], r"--top-k must be >= 0 \(0: off\), got -1"),
    (["--sample", "--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
    (["--demo-sampling", "--top-p", "1.5"], r"--top-p must be in \(0, 1\], got 1.5"),
    (["--sample", "--seed", "-1"], r"--seed must be in \[0, 2\*\*32\)"),
    (["--sample", "--seed", str(2**32)], r"--seed must be in \[0, 2\*\*32\)"),
    (["--beam-rules", "released"], r"--beam-rules needs --num-beams > 1"),
    (["--demo-beams", "--num-beams", "1", "--beam-rules", "hf"], r"--beam-rules needs --num-beams > 1"),
    (["--num-beams", "3", "--beam-rules", "demo"], r"--beam-rules must be one of hf, released, got 'demo'"),
    (["--sample", "--num-beams", "2", "--beam-rules", "hf"], r"runs only as transformers 4.31 does"),
    (["--demo-sampling", "--demo-beams", "--beam-rules", "hf"], r"runs only as transformers 4.31 does"),
])
def test_bad_decoding_flags_are_refused_before_the_checkpoint_loads(config_args, tmp_path, image_file, capsys,
                                                                     monkeypatch, flags, message):
    import re

    from jaxground.infer import command

    monkeypatch.setattr(command, "load_model", lambda *a, **kw: pytest.fail("the checkpoint was loaded"))
    assert main(predict_args(config_args, tmp_path / "no_such_run", image_file, *flags)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("jaxground predict: ") and re.search(message, captured.err), captured.err


def test_same_seed_same_answer(config_args, image_file, tmp_path, capsys, monkeypatch):
    """The command with a real tiny random model (its load stubbed), at the demo's settings but hotter: one seed
    gives one answer (text and boxes), other seeds give others; `--json` records the seed."""
    from jaxground.config import load_config

    model = build_model(load_config("configs/eval_shapes.py", config_args), rigged=False, std=0.3)
    stub_load_model(monkeypatch, model)

    def answer(seed):
        code = main(predict_args(config_args, tmp_path, image_file, "--demo-sampling", "--temperature", "1.5",
                                 "--seed", str(seed)))
        captured = capsys.readouterr()
        assert code == 0, captured.err
        out = json.loads(captured.out)
        assert out["decoding"]["seed"] == seed
        return out["answer"], out["objects"]

    first = answer(0)
    assert answer(0) == first
    assert any(answer(seed) != first for seed in (1, 2, 3))


def test_sampled_beam_search_runs(config_args, image_file, tmp_path, capsys, monkeypatch):
    """`--demo-sampling --num-beams 3` through the command with a real tiny random model: an answer, the same one
    for the same seed, and `--json` records the sampled beam search."""
    from jaxground.config import load_config

    model = build_model(load_config("configs/eval_shapes.py", config_args), rigged=False, std=0.3)
    stub_load_model(monkeypatch, model)

    def answer():
        code = main(predict_args(config_args, tmp_path, image_file, "--demo-sampling", "--num-beams", "3",
                                 "--seed", "4"))
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)

    first = answer()
    assert first["decoding"] == {"method": "beam_sample", "num_beams": 3, "temperature": 0.8, "top_k": 5,
                                 "top_p": 0.7, "seed": 4, "beam_rules": "released"}
    assert answer() == first


def test_demo_beams_runs(config_args, image_file, tmp_path, capsys, monkeypatch):
    """`--demo-beams` (five beams, transformers 4.31's rules) through the command with a real tiny random model: an
    answer, and `--json` records the rules."""
    from jaxground.config import load_config

    model = build_model(load_config("configs/eval_shapes.py", config_args), rigged=False, std=0.3)
    stub_load_model(monkeypatch, model)
    code = main(predict_args(config_args, tmp_path, image_file, "--demo-beams"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["decoding"] == {"method": "beam", "num_beams": 5, "beam_rules": "released"}
    assert isinstance(out["answer"], str)


def test_overflowed_beam_scores_refused(config_args, image_file, tmp_path, capsys, monkeypatch):
    """A sampled beam search whose scores passed float32's range (`Generation.overflowed`, tested against 4.31 in
    test_beam_sample.py; set here on the real tiny model's output: its answers end at eos long before) is refused in
    one line with status 2, where 4.31 raises, instead of printing an answer 4.31 would not give."""
    import jax.numpy as jnp

    from jaxground.config import load_config
    from jaxground.infer import predict

    stub_load_model(monkeypatch, build_model(load_config("configs/eval_shapes.py", config_args), rigged=False, std=0.3))
    real = predict.generate_nextchat
    monkeypatch.setattr(predict, "generate_nextchat",
                        lambda *a, **kw: real(*a, **kw).replace(overflowed=jnp.ones((1,), bool)))
    code = main(predict_args(config_args, tmp_path, image_file, "--demo-sampling", "--num-beams", "3"))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxground predict: sampled beam search: the beam scores passed "
                                                   "float32's range within 6 tokens"), lines
    assert "temperature 0.8 again" in lines[0]


def test_non_finite_boxes_refused(config_args, image_file, tmp_path, capsys, monkeypatch):
    """A model whose weights hold NaN decodes NaN boxes, which JSON cannot carry (json.dumps wrote a bare NaN) and the
    drawing cannot place: refused in one line, naming the weights."""
    import jax.numpy as jnp

    from jaxground.config import load_config
    from jaxground.infer import predict

    stub_load_model(monkeypatch, build_model(load_config("configs/eval_shapes.py", config_args)))  # answers <at>
    real = predict.generate_nextchat

    def nan_boxes(*a, **kw):
        out = real(*a, **kw)
        return out.replace(boxes=jnp.full_like(out.boxes, jnp.nan))
    monkeypatch.setattr(predict, "generate_nextchat", nan_boxes)
    code = main(predict_args(config_args, tmp_path, image_file))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out
    assert captured.err.strip() == ("jaxground predict: the model decoded a non-finite box (NaN or infinity): its "
                                    "weights hold NaN or infinity, or overflowed in this dtype")
