"""Every `jaxground bench` command runs end to end at a tiny size and prints its figures; where a command
checks that both frameworks computed the same thing, that check holds. Speed is not tested (see README,
Performance)."""

import re

import pytest

from jaxground.cli import main
from jaxground.data.shapes import write_dataset

TINY_LLAMA = ["--layers", "1", "--hidden", "64", "--heads", "2", "--vocab", "128", "--repeats", "1"]


def _run(capsys, *argv) -> str:
    assert main(["bench", *argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    return out


def _floats(pattern: str, text: str) -> list[float]:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in\n{text}"
    return [float(g) for g in m.groups()]


def test_forward(capsys):
    out = _run(capsys, "forward", "--batch", "2", "--seq", "8", *TINY_LLAMA)
    assert _floats(r"max \|logit diff\| ([\d.e+-]+)", out)[0] < 1e-4


def test_generate_both(capsys):
    out = _run(capsys, "generate", "--what", "both", "--batches", "2", "--prompt", "6", "--new-tokens", "3",
               *TINY_LLAMA, "--rec-samples", "3", "--rec-batch", "2", "--torch-threads", "1")
    assert "same tokens 100%" in out
    assert _floats(r"boxes max \|diff\| ([\d.e+-]+)", out)[0] < 1e-4


def test_sam(capsys):
    out = _run(capsys, "sam", "--preset", "tiny", "--batch", "1", "--iters", "1")
    assert "jit on the split state" in out and "nnx.jit on the module" in out
    assert _floats(r"max \|diff\| ([\d.e+-]+)", out)[0] < 1e-4


def test_pipeline(capsys, tmp_path):
    write_dataset(tmp_path / "shapes", train=64, val=4, test=4)
    out = _run(capsys, "pipeline", "--data", str(tmp_path / "shapes"), "--workers", "0", "--batch-size", "4",
               "--batches", "2")
    assert _floats(r"grain / torch with 0 workers: ([\d.]+)x", out)[0] > 0


def test_convert(capsys, tmp_path):
    out = _run(capsys, "convert", "--layers", "1", "--hidden", "64", "--intermediate", "128", "--vocab", "128",
               "--workdir", str(tmp_path))
    assert "within target" in out or "over target" in out


@pytest.mark.slow
def test_train_tiny_losses_agree(capsys):
    out = _run(capsys, "train", "--size", "tiny", "--batch", "2", "--repeats", "1", "--rounds", "3",
               "--no-torch-compile")
    jax_loss, torch_loss = _floats(r"first-step loss JAX ([\d.]+) vs torch ([\d.]+)", out)
    assert abs(jax_loss - torch_loss) < 1e-4
    jax_rate, torch_rate, peak = _floats(
        r"JAX \(jitted\) ([\d.]+) GFLOP/s, torch ([\d.]+) GFLOP/s; peak, the MFU denominator: ([\d.]+)", out)
    assert peak == max(jax_rate, torch_rate)
    # MFU = step FLOPs / step time / that peak, within the printed figures' rounding
    step_s, mfu = _floats(r"\| tiny \| [^|]+\| [^|]+\| ([\d.]+) \| [\d.]+ \| ([\d.]+)% \|", out)
    (gflop,) = _floats(r"tiny: JAX ([\d.]+) GFLOP/step", out)
    assert mfu == pytest.approx(100 * gflop / step_s / peak, rel=0.1)
    # JAX / eager: the median of the three rounds' ratios, within their printed range
    median, low, high = _floats(r"\| ([\d.]+)x \(([\d.]+)-([\d.]+)\) \| - \|", out)
    assert low <= median <= high


def test_without_torch_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as in a .venv without the torch extra
    assert main(["bench", "train", "--size", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "needs PyTorch" in err and ".[torch]" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["train", "--size", "tiny", "--seq", "70"], "--seq 70 leaves 3 text tokens after 64 image tokens; need >= 24"),
    (["train", "--size", "tiny", "--profile", "A_FILE"], "--profile: A_FILE is a file, not a folder"),
    (["forward", "--batch", "-1"], "--batch must be >= 1, got -1"),
    (["plan", "--mesh", "fsdp=0"], "--mesh 'fsdp=0': expected data=D,fsdp=F,tensor=T with positive sizes"),
    (["convert", "--layers", "0"], "--layers, --hidden, --intermediate and --vocab must be >= 1"),
])
def test_bad_options_one_line_and_exit_2(capsys, tmp_path, argv, message):
    """Before any measuring (the train benchmark's --seq and --profile used to fail after its matmul peak, the
    latter after the whole run): one line naming the benchmark, exit status 2."""
    (tmp_path / "a_file").write_text("")
    argv = [str(tmp_path / "a_file") if a == "A_FILE" else a for a in argv]
    assert main(["bench", *argv]) == 2
    out, err = capsys.readouterr()
    assert "|" not in out  # no table started
    assert err == f"jaxground bench {argv[0]}: {message.replace('A_FILE', str(tmp_path / 'a_file'))}\n"
