"""`jaxground convert`: detection of HF LLaMA / CLIP / official and HF SAM sources, progress output, refusal of
pickles that carry code (never executed), one error listing every bad key before anything is written, and no
loadable output after an interrupted conversion."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, LlamaForCausalLM
from transformers import LlamaConfig as HFLlamaConfig

from jaxground.cli import main
from jaxground.convert import ConversionError
from jaxground.convert.command import convert
from jaxground.convert.reader import UnsafeCheckpointError
from jaxground.convert.store import StoreWriter, load_converted
from jaxground.parallel import make_mesh

LLAMA = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(HFLlamaConfig(**LLAMA)).save_pretrained(path)
    return path


class _Payload:
    """Unpickling this object would create a file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        convert([tmp_path / "evil.pth"], tmp_path / "out", quiet=True)
    assert main(["convert", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "Unsupported global: GLOBAL " in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxground convert: ") and "missing" in err and "Traceback" not in err
    # files with a weight suffix that are not checkpoints: torch.load fails with KeyError, UnpicklingError, ...
    for name, data in (("text.pth", b"hi\n"), ("json.bin", b"{}"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        assert main(["convert", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"jaxground convert: {tmp_path / name}: not a checkpoint torch.load can read ("), err
        assert "Traceback" not in err and "refused to load" not in err and len(err.splitlines()) == 1, err
    # safetensors files it cannot read: empty, not safetensors, cut short (an interrupted download)
    save_file({"model.embed_tokens.weight": torch.zeros(64, 64)}, str(tmp_path / "whole.safetensors"))
    whole = (tmp_path / "whole.safetensors").read_bytes()
    for name, data in (("empty.safetensors", b""), ("text.safetensors", b"hi\n" * 4), ("cut.safetensors", whole[:-100])):
        (tmp_path / name).write_bytes(data)
        assert main(["convert", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"jaxground convert: {tmp_path / name}: not a safetensors file it can read ("), err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    # NExT-Chat weights without their config.json, or with one that is not JSON: named, for a command-line user
    released = tmp_path / "released"
    released.mkdir()
    save_file({"loc_encoder.0.weight": torch.zeros(4, 4), "model.embed_tokens.weight": torch.zeros(8, 4)},
              str(released / "model.safetensors"))
    assert main(["convert", str(released), "--out", str(tmp_path / "out")]) == 2
    assert f"no config: {released} holds no config.json (convert the released folder" in capsys.readouterr().err
    (released / "config.json").write_text("{bad")
    assert main(["convert", str(released), "--out", str(tmp_path / "out")]) == 2
    assert f"{released / 'config.json'} is not JSON: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_that_cannot_be_a_folder_is_refused_before_reading(llama_dir, tmp_path, capsys):
    """`convert` and `export` refuse an --out that is a file or lies under one, in one line, before any source is
    read (the missing export checkpoint would be reported otherwise)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out in (a_file, a_file / "sub"):
        for command in (["convert", str(llama_dir)], ["export", "--checkpoint", str(tmp_path / "missing")]):
            assert main([*command, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err == f"jaxground {command[0]}: --out: {a_file} is a file, not a folder\n", err


def test_overwrite_replaces_only_a_converted_checkpoint(llama_dir, tmp_path, capsys):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("not a checkpoint")
    assert main(["convert", str(llama_dir), "--out", str(keep), "--overwrite"]) == 2
    assert "not a converted checkpoint" in capsys.readouterr().err
    assert (keep / "mine.txt").read_text() == "not a checkpoint"
    assert main(["convert", str(llama_dir), "--out", str(tmp_path / "out")]) == 0
    assert main(["convert", str(llama_dir), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    load_converted(tmp_path / "out")


def test_every_bad_key_in_one_error_before_writing(llama_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(llama_dir / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 16)
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(ConversionError) as e:
        convert([bad], tmp_path / "out", quiet=True)
    assert e.value.missing == ["layers.0.k.kernel", "layers.1.up.kernel"]
    assert e.value.unexpected == ["model.layers.0.self_attn.extra.weight (llama)"]
    assert len(e.value.misshaped) == 1 and "k_proj" in e.value.misshaped[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_interrupted_conversion_leaves_nothing_loadable(llama_dir, tmp_path, monkeypatch):
    calls = []
    original = StoreWriter.flush

    def failing_flush(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill mid-conversion")
        original(self)

    monkeypatch.setattr(StoreWriter, "flush", failing_flush)
    with pytest.raises(KeyboardInterrupt):
        convert([llama_dir], tmp_path / "out", flush_bytes=1, quiet=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(FileNotFoundError, match="not a converted checkpoint"):
        load_converted(tmp_path / "out")


def test_killed_conversion_aside_directory_is_not_a_checkpoint(llama_dir, tmp_path, monkeypatch):
    """A hard kill skips all cleanup: what is left is the aside directory, without the config written last."""
    monkeypatch.setattr(StoreWriter, "__exit__", lambda self, *exc: None)  # as if the process died
    monkeypatch.setattr("jaxground.convert.store.StoreWriter.commit", lambda *a, **k: (_ for _ in ()).throw(
        SystemExit("killed")))
    with pytest.raises(SystemExit):
        convert([llama_dir], tmp_path / "out", flush_bytes=1, quiet=True)
    (aside,) = tmp_path.glob(".out.partial-*")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError):
        load_converted(aside)


def test_llama_directory_with_progress(llama_dir, tmp_path, capsys):
    assert main(["convert", str(llama_dir), "--out", str(tmp_path / "out")]) == 0
    assert "21/21 tensors" in capsys.readouterr().err
    model, cfg = load_converted(tmp_path / "out")
    hf = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    ids = np.array([[1, 5, 39, 7]], np.int32)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert cfg.num_kv_heads == 2 and np.abs(np.asarray(model(ids)) - want).max() <= 1e-5
    sharded, _ = load_converted(tmp_path / "out", mesh=make_mesh((1, -1, 1)))  # read straight into shardings
    kernel = sharded.layers[0].q.kernel.get_value()
    assert tuple(kernel.sharding.spec) == ("fsdp", "tensor") and len(kernel.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model.layers[0].q.kernel.get_value()))
    with pytest.raises(FileExistsError, match="exists"):
        convert([llama_dir], tmp_path / "out", quiet=True)


def test_full_clip_model_directory(tmp_path):
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        vision_config={"image_size": 28, "patch_size": 14, "hidden_size": 16, "intermediate_size": 24,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        text_config={"vocab_size": 30, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 8}))
    clip.save_pretrained(tmp_path / "clip")
    convert([tmp_path / "clip"], tmp_path / "out", quiet=True)
    model, cfg = load_converted(tmp_path / "out")
    assert cfg.num_layers == 2
    np.testing.assert_array_equal(np.asarray(model.layers[1].fc2.bias[...]),
                                  clip.vision_model.encoder.layers[1].mlp.fc2.bias.detach().numpy())


def test_hf_sam_directory(tmp_path):
    from transformers import SamConfig as HFSamConfig
    from transformers import SamModel

    torch.manual_seed(0)
    hf = SamModel(HFSamConfig(
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64,
                       "patch_size": 16, "output_channels": 32, "window_size": 2, "global_attn_indexes": [1],
                       "mlp_dim": 64, "num_pos_feats": 16},
        prompt_encoder_config={"hidden_size": 32, "image_size": 64, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
                             "iou_head_hidden_dim": 32}))
    hf.save_pretrained(tmp_path / "sam")
    convert([tmp_path / "sam"], tmp_path / "out", quiet=True)
    model, cfg = load_converted(tmp_path / "out")
    assert (cfg.width, cfg.depth, cfg.prompt_dim, cfg.img_size) == (32, 2, 32, 64)
    np.testing.assert_array_equal(np.asarray(model.mask_decoder.iou_token[...]),
                                  hf.mask_decoder.iou_token.weight.detach().numpy())
