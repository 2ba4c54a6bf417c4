"""`jaxground eval` and `jaxground predict` on a mesh and on several hosts. An unrigged tiny random NextChat with
a tiny SAM (its answers differ per sample, some with a trigger and some without) is evaluated on one device, on
the 8 simulated devices of tests/conftest.py (mesh fsdp=4 x tensor=2, the batch split 4 ways) and by two
processes of 4 devices each (gloo over 127.0.0.1); the shapes split has 24 REC expressions and 9 counting
questions, so the two hosts get a padding row."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxground import cli

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import _processes as processes
from test_end_to_end import build_model, overrides

TASKS = ("rec", "res", "rec_gen", "res_gen", "count")
MESH = ("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2")
CONFIG = "configs/eval_shapes.py"

pytestmark = pytest.mark.skipif(jax.device_count() != 8,
                                reason="needs the 8 simulated devices of tests/conftest.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, args): the data, and the unrigged model saved as `jaxground train` saves it under root/run."""
    import optax
    from flax import nnx

    from jaxground import checkpoint
    from jaxground.config import load_config
    from jaxground.data.shapes import write_dataset
    from jaxground.infer.command import load_encoder
    from jaxground.train.state import PathFilter, init_state

    root = tmp_path_factory.mktemp("mesh")
    write_dataset(root / "shapes", train=8, val=1, test=3, size=32, max_objects=2)
    args = [*overrides(root / "shapes"), "eval.batch_size=8", *MESH]
    config = load_config(CONFIG, args)
    _, tokens = load_encoder(config)
    model = build_model(config, rigged=False, std=0.3)
    kernel = model.llm.lm_head.kernel
    kernel.set_value(kernel.get_value().at[:, tokens.at].multiply(4.0))  # some answers hold a trigger
    ck = checkpoint.Checkpointer(root / "run" / "checkpoints", save_every=1, keep=1, async_save=False)
    ck.save(1, init_state(nnx.state(model), optax.sgd(0.0), PathFilter([])), config=config.to_dict(), force=True)
    ck.close()
    return root, args


def spy_load_model(monkeypatch) -> list:
    """Records the models `jaxground eval` / `predict` load."""
    from jaxground.infer import command

    loaded, real = [], command.load_model
    monkeypatch.setattr(command, "load_model", lambda *a, **kw: loaded.append(real(*a, **kw)) or loaded[-1])
    return loaded


def assert_sharded_over_8(model) -> None:
    from flax import nnx

    arrays = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))]
    assert all(len(a.sharding.device_set) == 8 for a in arrays)
    assert any(not a.sharding.is_fully_replicated for a in arrays)  # the rules table split the weights


def read(out: Path) -> tuple[dict, list[dict]]:
    return (json.loads((out / "eval.json").read_text()),
            [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()])


@pytest.fixture(scope="module")
def on_eight(tiny, tmp_path_factory):
    """`jaxground eval` in this process on the 8-device mesh -> (figures, rows, the loaded model)."""
    root, args = tiny
    out = tmp_path_factory.mktemp("eight")
    with pytest.MonkeyPatch.context() as mp:
        loaded = spy_load_model(mp)
        code = cli.main(["eval", "--config", CONFIG, "--checkpoint", str(root / "run"), "--out", str(out),
                         "--tasks", ",".join(TASKS), *args])
    assert code == 0
    return (*read(out), loaded[0])


def assert_rows_close(got: list[dict], want: list[dict], atol: float) -> None:
    """Equal rows, box coordinates and mask IoUs (rounded to 4 decimals) within `atol`."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), (a, b)
        for k in a:
            if isinstance(a[k], float) or (isinstance(a[k], list) and a[k] and isinstance(a[k][0], float)):
                np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=str((a, b)))
            else:
                assert a[k] == b[k], (k, a, b)


def test_eval_on_a_mesh_equals_one_device(tiny, on_eight):
    """The model split over 8 devices and each batch over 4 shards gives one device's figures (to 1e-6) and
    prediction rows (answers, trigger counts, indices exact; boxes and mask IoUs within one unit of their
    4-decimal rounding)."""
    from jaxground.config import load_config
    from jaxground.eval.evaluate import evaluate
    from jaxground.infer.command import load_encoder, load_model
    from jaxground.parallel import make_mesh

    root, args = tiny
    figures, rows, model = on_eight
    assert_sharded_over_8(model)
    config = load_config(CONFIG, args)
    one = make_mesh((1, 1, 1), jax.devices()[:1])
    encoder, _ = load_encoder(config)
    want_figures, want_rows = json.loads(json.dumps(evaluate(load_model(config, str(root / "run"), encoder, one),
                                                             encoder, config, TASKS, mesh=one)))
    assert figures.keys() == want_figures.keys() == set(TASKS)
    for task, splits in want_figures.items():
        for split, f in splits.items():
            assert figures[task][split].keys() == f.keys()
            got = figures[task][split]
            assert [k for k in f if got[k] is None] == [k for k in f if f[k] is None]  # count's mae, none parsed
            np.testing.assert_allclose([got[k] for k in f if f[k] is not None],
                                       [v for v in f.values() if v is not None], atol=1e-6, rtol=0)
    assert_rows_close(rows, want_rows, atol=1.5e-4)
    generated = [r for r in rows if r["task"] == "rec_gen"]
    assert len({r["answer"] for r in generated}) > len(generated) // 2  # answers differ between samples
    assert 0 < sum(r["pred"] is not None for r in generated) < len(generated)
    assert [figures[t]["shapes_test"]["count"] for t in TASKS] == [24, 24, 24, 24, 9]


def run_two(*args) -> str:
    """`jaxground eval` as processes 0 and 1 of one run, each with its own `args`, both succeeding -> process 0's
    stderr."""
    results = processes.start_command("eval", *args)
    assert [code for code, _, _ in results] == [0, 0], "\n".join(err[-3000:] for _, _, err in results)
    shown = [out.splitlines() for _, out, _ in results]  # gloo's C++ prints go to stderr (`distributed.start`)
    assert len(shown[0]) == 1 and shown[0][0].startswith("{") and shown[1] == []  # only process 0 prints figures
    return results[0][2]


def test_two_hosts_equal_one(tiny, on_eight, tmp_path):
    """Two processes, each reading its half of every split, write exactly the eval.json and predictions.jsonl of
    one process on the same 8-device mesh and global batch; process 1 writes nothing. Two tasks keep it short:
    `res_gen` (a jitted step whose rows carry their metric terms, as the forward tasks', with generation and the
    mask head inside), scored at original pixels (`eval.res_pixels=original`: each host scores its own rows
    against the records of the samples they are), and counting (host-scored generation on the 9 questions: 5 and
    4 + a padding row per host). Then, the count split's file dropped as if a crash had come before it was saved,
    `--resume` on both: process 0's saved res_gen reaches process 1, and only count runs again."""
    root, args = tiny
    figures, rows, _ = on_eight
    tasks = ("res_gen", "count")
    pixels = "eval.res_pixels=original"
    outs = [tmp_path / "out0", tmp_path / "out1", tmp_path / "one"]
    common = ["--config", CONFIG, "--checkpoint", root / "run", *args, pixels]
    run_two(["--out", outs[0], *common, "--tasks", ",".join(tasks)],
            ["--out", outs[1], *common, "--tasks", ",".join(tasks)])
    assert cli.main(["eval", "--out", str(outs[2]), *map(str, common), "--tasks", "res_gen"]) == 0
    one_figures, one_rows = read(outs[2])
    assert one_figures["res_gen"] != figures["res_gen"]  # not the grid's figures
    assert read(outs[0]) == ({"res_gen": one_figures["res_gen"], "count": figures["count"]},
                             one_rows + [r for r in rows if r["task"] == "count"])
    assert not outs[1].exists()

    (outs[0] / "splits" / "count.shapes_test.json").unlink()
    (outs[0] / "predictions.jsonl").unlink()
    shown = run_two(["--out", outs[0], *common, "--tasks", ",".join(tasks), "--resume"],
                    ["--out", outs[1], *common, "--tasks", ",".join(tasks), "--resume"])
    assert "eval res_gen/" not in shown and "eval count/shapes_test: done" in shown
    assert read(outs[0]) == ({"res_gen": one_figures["res_gen"], "count": figures["count"]},
                             one_rows + [r for r in rows if r["task"] == "count"])


def test_gather_rows_orders_by_sample(monkeypatch):
    """Host h of n holds samples h, h + n, ...: position p of its batches (padding rows counted) is sample
    p * n + h."""
    from jaxground.eval import gather

    host0 = [{"index": 0, "s": 0}, {"index": 2, "s": 4}]  # its position 1 (sample 2) was an invalid row
    host1 = [{"index": 0, "s": 1}, {"index": 1, "s": 3}]
    monkeypatch.setattr(gather.jax, "process_count", lambda: 2)
    monkeypatch.setattr(gather, "_allgather_bytes", lambda _: [json.dumps(h).encode() for h in (host0, host1)])
    assert gather.gather_rows(host0) == [{"index": i, "s": s} for i, s in enumerate((0, 1, 3, 4))]


def test_predict_on_a_mesh_equals_one_device(tiny, capsys, monkeypatch):
    """The same answers, boxes (to 1e-3 pixels) and masks (areas within 1 pixel) on 8 devices as on one."""
    from jaxground.config import load_config
    from jaxground.infer.command import load_encoder, load_model
    from jaxground.infer.generate import GenerationConfig
    from jaxground.infer.predict import mask_function, predict
    from jaxground.parallel import make_mesh

    root, args = tiny
    image = np.zeros((24, 40, 3), np.uint8)
    image[4:20, 8:30] = (200, 40, 40)
    path = root / "img.png"
    Image.fromarray(image).save(path)
    prompts = ["what is [0]?"]  # one prompt length: one compile per mesh
    tsv = root / "requests.tsv"
    tsv.write_text("".join(f"{path}\t{p}\t\t8,4,30,20\n" for p in prompts))
    loaded = spy_load_model(monkeypatch)
    code = cli.main(["predict", "--config", CONFIG, "--checkpoint", str(root / "run"), "--list", str(tsv),
                     "--max-new-tokens", "12", "--json", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert_sharded_over_8(loaded[0])
    got = [json.loads(line) for line in captured.out.splitlines()]

    config = load_config(CONFIG, args)
    encoder, ids = load_encoder(config)
    model = load_model(config, str(root / "run"), encoder, make_mesh((1, 1, 1), jax.devices()[:1]))
    cfg = GenerationConfig(max_new_tokens=12, max_triggers=8, eos_id=ids.eos, pad_id=ids.pad, at_id=ids.at,
                           boxes_id=ids.boxes)
    want = [predict(model, encoder, image, p, [np.array([8, 4, 30, 20], np.float32)], cfg,
                    mask_fn=mask_function(model, image), pad_fill=config.data.pad_fill).to_json() for p in prompts]
    assert sum(len(w["objects"]) for w in want) > 0  # some answers hold a boxed object
    for g, w in zip(got, want):
        assert g["answer"] == w["answer"] and len(g["objects"]) == len(w["objects"])
        for a, b in zip(g["objects"], w["objects"]):
            np.testing.assert_allclose(a["box"], b["box"], atol=1e-3, rtol=0)
            assert abs(a["mask_area"] - b["mask_area"]) <= 1


@pytest.mark.parametrize("command, extra, message", [
    ("eval", ["eval.batch_size=6"], r"eval.batch_size 6: batch 6 does not divide into .* 4 data shards"),
    ("eval", ["mesh.fsdp=3"], r"mesh \{'data': 1, 'fsdp': 3, 'tensor': 2\} needs 6 devices, have 8"),
    ("predict", ["mesh.tensor=3"], r"mesh \{'data': 1, 'fsdp': 4, 'tensor': 3\} needs 12 devices, have 8"),
])
def test_bad_mesh_or_batch_refused_before_loading(tiny, capsys, command, extra, message):
    """One line, exit status 2, before the checkpoint is read (it does not exist)."""
    import re

    root, args = tiny
    request = ["--image", str(root / "img.png"), "--prompt", "what?", "--max-new-tokens", "4"]
    request = request if command == "predict" else []
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "img.png")
    missing = str(root / "missing")
    assert cli.main([command, "--config", CONFIG, "--checkpoint", missing, *request, *args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxground {command}: ") and len(err.splitlines()) == 1 and re.search(message, err), err


def shapes_image(path: Path, colour, box) -> Path:
    """A 24 x 40 picture (one size for every request: one compile of the mask head) with one coloured box."""
    image = np.zeros((24, 40, 3), np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = colour
    Image.fromarray(image).save(path)
    return path


def predict_one_and_two(tiny, tmp_path, capsys, request: list, lines: list[str] | None = None):
    """`jaxground predict --json` on the 8-device mesh in this process and by two processes of 4 devices ->
    (one process's JSON lines, two processes' results). With `lines` (TSV lines whose OUT stands for the
    out.png path) the request is a --list, each process its own file naming its own out.png (out0, out1; one:
    out_one): only the images, prompts and boxes must agree between hosts."""
    root, args = tiny
    common = ["--config", CONFIG, "--checkpoint", root / "run", "--max-new-tokens", "12", "--json", *request, *args]

    def requests(name: str) -> list:
        if lines is None:
            return []
        tsv = tmp_path / f"{name}.tsv"
        tsv.write_text("".join(line.replace("OUT", str(tmp_path / f"{name}.png")) + "\n" for line in lines))
        return ["--list", tsv]

    results = processes.start_command("predict", [*requests("out0"), *common], [*requests("out1"), *common])
    assert [code for code, _, _ in results] == [0, 0], "\n".join(err[-3000:] for _, _, err in results)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        loaded = spy_load_model(mp)
        code = cli.main(["predict", *map(str, [*requests("out_one"), *common])])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert_sharded_over_8(loaded[0])
    return [json.loads(line) for line in captured.out.splitlines()], results


def assert_same_answers(got: list[dict], want: list[dict]) -> None:
    """Answers, object references, masks (COCO RLE) and the decoding record exact; boxes within 0.0101 pixels
    (--json rounds them to 0.01: float round-off may tip one rounding), mask IoUs within 1.01e-4 (rounded to
    4 decimals)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and g["answer"] == w["answer"] and g["decoding"] == w["decoding"], (g, w)
        assert [o["ref"] for o in g["objects"]] == [o["ref"] for o in w["objects"]]
        for a, b in zip(g["objects"], w["objects"]):
            np.testing.assert_allclose(a["box"], b["box"], atol=0.0101, rtol=0)
            assert a["mask_rle"] == b["mask_rle"] and a["mask_area"] == b["mask_area"]
            assert abs(a["mask_iou"] - b["mask_iou"]) <= 1.01e-4


def test_predict_two_hosts_equal_one(tiny, tmp_path, capsys):
    """Two processes (4 devices each, the 8-device mesh fsdp=4 x tensor=2 across them) answer a --list of two
    images as one process on 8 devices does: the same answer text, boxes and masks, and process 0's out.png has
    the one process's pixels; process 1 prints nothing and writes no file."""
    a = shapes_image(tmp_path / "a.png", (200, 40, 40), (8, 4, 30, 20))
    b = shapes_image(tmp_path / "b.png", (40, 200, 40), (2, 10, 16, 22))
    lines = [f"{a}\twhat is [0]?\tOUT\t8,4,30,20", f"{b}\twhat is [0]?\t\t2,10,16,22"]  # one prompt length
    want, results = predict_one_and_two(tiny, tmp_path, capsys, [], lines)
    assert sum(len(w["objects"]) for w in want) > 0  # some answers hold a boxed object with its mask
    (_, out0, _), (_, out1, _) = results
    assert_same_answers([json.loads(line) for line in out0.splitlines()], want)
    assert out1 == "" and not (tmp_path / "out1.png").exists()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out0.png")),
                                  np.asarray(Image.open(tmp_path / "out_one.png")))


def test_predict_two_hosts_sample_as_one(tiny, tmp_path, capsys):
    """`--sample --seed 5` (hot: temperature 1.5; this seed's answer holds an object) draws the same answer, box and
    mask on two processes as one process of 8 devices does."""
    a = shapes_image(tmp_path / "a.png", (200, 40, 40), (8, 4, 30, 20))
    request = ["--image", a, "--prompt", "what is [0]?", "--box", "8,4,30,20"]
    want, results = predict_one_and_two(tiny, tmp_path, capsys, [*request, "--sample", "--seed", "5", "--temperature", "1.5"])
    (_, out0, _), (_, out1, _) = results
    assert_same_answers([json.loads(line) for line in out0.splitlines()], want)
    assert out1 == ""
    assert want[0]["decoding"] == {"method": "sample", "temperature": 1.5, "top_k": 0, "top_p": 1.0, "seed": 5}
    assert len(want[0]["objects"]) == 1


def test_predict_refused_on_every_host_when_one_cannot_read_its_image(tiny, tmp_path):
    """Process 1 cannot read the image: both processes refuse with its message and exit status 2 before the model
    loads, neither left waiting for the other (a hang fails at the timeout), and neither prints on stdout."""
    root, args = tiny
    image = shapes_image(tmp_path / "a.png", (200, 40, 40), (8, 4, 30, 20))
    missing = tmp_path / "elsewhere" / "a.png"
    common = ["--config", CONFIG, "--checkpoint", root / "run", "--prompt", "what is [0]?", "--box", "8,4,30,20",
              "--max-new-tokens", "4", *args]
    results = processes.start_command("predict", ["--image", image, *common], ["--image", missing, *common],
                                      timeout=120)
    processes.assert_refused_together(results, f"jaxground predict: process 1: image not found: {missing}")
    assert [out for _, out, _ in results] == ["", ""]


@pytest.mark.parametrize("lacks", ["checkpoint", "tokenizer", "split"])
def test_eval_refused_on_every_host_when_one_lacks_a_file(tiny, tmp_path, lacks):
    """Process 1 finds no checkpoint at its --checkpoint, no data (the tokenizer is read from it), or no records of
    the evaluated split: both processes refuse with its message and exit status 2 before the model loads; process 0
    is not left inside Orbax's restore (or the evaluation's first collective) waiting for process 1."""
    root, args = tiny
    missing = (tmp_path / "elsewhere").absolute()
    common = ["--config", CONFIG, "--tasks", "rec", *args]
    checkpoints, data = [root / "run", root / "run"], [[], []]  # data: overrides, which come last
    line = "jaxground eval: process 1: "
    if lacks == "checkpoint":
        checkpoints[1] = missing
        line += f"no checkpoint found at {missing}"
    else:
        data[1] = [f"paths.shapes={missing}" if lacks == "tokenizer" else f"eval.datasets.shapes_test.path={missing}"]
    own = [["--out", tmp_path / f"out{i}", "--checkpoint", checkpoints[i], *common, *data[i]] for i in (0, 1)]
    results = processes.start_command("eval", *own, timeout=120)
    processes.assert_refused_together(results, line, contains=str(missing))
    assert not (tmp_path / "out0" / "eval.json").exists()


def test_predict_refused_when_a_host_reads_another_step(tiny, tmp_path):
    """Process 1's --checkpoint holds an older copy, the latest step another than process 0's: both refuse with
    status 2 before the model loads, naming both steps, rather than restore different weights into one mesh."""
    import shutil

    root, args = tiny
    copy = tmp_path / "copy" / "checkpoints"
    shutil.copytree(root / "run" / "checkpoints", copy)
    (copy / "1").rename(copy / "7")
    image = shapes_image(tmp_path / "a.png", (200, 40, 40), (8, 4, 30, 20))
    common = ["--config", CONFIG, "--image", image, "--prompt", "what is [0]?", "--box", "8,4,30,20",
              "--max-new-tokens", "4", *args]
    results = processes.start_command("predict", ["--checkpoint", root / "run", *common],
                                      ["--checkpoint", copy.parent, *common], timeout=120)
    processes.assert_refused_together(results, "jaxground predict: process 1 read other checkpoint than process 0 "
                                               "(step 7 against step 1): every host must read the same files")


@pytest.mark.parametrize("error", ["OSError", "ValueError"])
def test_eval_stops_on_every_host_when_one_fails_after_comparing(tiny, tmp_path, error):
    """Process 1 fails alone right after the hosts compared (an exception, or a refusal of eval's type): process 0,
    gone on to load the model, stops within seconds naming process 1's failure, where both used to wait until JAX's
    shutdown barrier gave up after 5 minutes (a hang fails at the timeout)."""
    root, args = tiny
    common = ["--config", CONFIG, "--checkpoint", root / "run", "--tasks", "rec", *args]
    results = processes.start_command("eval", ["--out", tmp_path / "out0", *common],
                                      [f"--fail-after-comparison={error}", "--out", tmp_path / "out1", *common],
                                      timeout=120)
    processes.assert_injected_stopped_together(results, "eval", error)
    assert not (tmp_path / "out0" / "eval.json").exists()


def test_predict_stops_on_every_host_when_one_fails_after_comparing(tiny, tmp_path):
    """As eval's: process 1 raises after the comparison, process 0 stops naming it."""
    root, args = tiny
    image = shapes_image(tmp_path / "a.png", (200, 40, 40), (8, 4, 30, 20))
    common = ["--config", CONFIG, "--checkpoint", root / "run", "--image", image, "--prompt", "what is [0]?",
              "--box", "8,4,30,20", "--max-new-tokens", "4", *args]
    results = processes.start_command("predict", common, ["--fail-after-comparison=OSError", *common], timeout=120)
    processes.assert_injected_stopped_together(results, "predict", "OSError")
