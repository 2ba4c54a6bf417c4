"""torch -> JAX -> torch is bit-exact: `jaxground convert` then `jaxground export`, compared key by key and bit by
bit with the source (LLaMA in float32 and bfloat16, official SAM with its conv / transposed-conv / stacked
embeddings, a released NExT-Chat directory, whose export also loads into the official classes)."""

import importlib.util
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from jaxground.cli import main
from jaxground.convert.store import read_config

_spec = importlib.util.spec_from_file_location("_sam_reference", Path(__file__).parents[1] / "_sam_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

LLAMA = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}


def roundtrip(source: Path, tmp_path: Path, *extra: str) -> dict:
    assert main(["convert", str(source), "--out", str(tmp_path / "jax"), *extra]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "jax"), "--out", str(tmp_path / "torch")]) == 0
    return load_file(str(tmp_path / "torch" / "model.safetensors"))


def assert_bit_exact(exported: dict, source: dict) -> None:
    assert sorted(exported) == sorted(source)
    for key, t in source.items():
        assert exported[key].dtype == t.dtype and exported[key].shape == t.shape, key
        assert torch.equal(exported[key].view(torch.uint8) if t.dtype == torch.bfloat16 else exported[key],
                           t.view(torch.uint8) if t.dtype == torch.bfloat16 else t), key


@pytest.mark.parametrize("source_dtype,jax_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                                    ("bfloat16", "float32")])
def test_llama_roundtrip_is_bit_exact(tmp_path, source_dtype, jax_dtype):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFLlamaConfig(**LLAMA)).to(getattr(torch, source_dtype))
    hf.save_pretrained(tmp_path / "src")
    exported = roundtrip(tmp_path / "src", tmp_path, "--dtype", jax_dtype)
    assert read_config(tmp_path / "jax")[1].param_dtype == jax_dtype
    assert_bit_exact(exported, {k: v.contiguous() for k, v in hf.state_dict().items()})


def test_official_sam_roundtrip_is_bit_exact(tmp_path):
    from jaxground.models.sam import SamConfig

    torch.manual_seed(0)
    sam = ref.official_sam(SamConfig.tiny())
    ref.perturb(sam)
    torch.save(sam.state_dict(), tmp_path / "sam_tiny.pth")
    exported = roundtrip(tmp_path / "sam_tiny.pth", tmp_path)
    assert read_config(tmp_path / "jax")[0] == "sam"
    assert_bit_exact(exported, sam.state_dict())


def test_released_nextchat_exports_its_own_layout(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFLlamaConfig(**(LLAMA | {"vocab_size": 45})))
    h = LLAMA["hidden_size"]
    state = dict(hf.state_dict())
    shapes = {"model.mm_projector.0.weight": (h, 8), "model.mm_projector.0.bias": (h,),
              "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,),
              "loc_encoder.0.weight": (h // 2, 4), "loc_encoder.0.bias": (h // 2,),
              "loc_encoder.2.weight": (h, h // 2), "loc_encoder.2.bias": (h,),
              "loc_decoder.0.weight": (h // 2, h), "loc_decoder.0.bias": (h // 2,),
              "loc_decoder.2.weight": (4, h // 2), "loc_decoder.2.bias": (4,)}
    state |= {k: torch.randn(s) for k, s in shapes.items()}
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=8, intermediate_size=12,
                                            num_hidden_layers=2, num_attention_heads=1))
    state |= {f"model.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v
              for k, v in clip.state_dict().items() if "post_layernorm" not in k}
    src = tmp_path / "nextchat"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(hf.config.to_dict() | {"model_type": "nextchat", "mm_depth": 2}))
    exported = roundtrip(src, tmp_path)
    assert_bit_exact(exported, state)
    # with a config.json the official classes build mm_projector from, and load ours into it
    spec = importlib.util.spec_from_file_location("_official_reference",
                                                  Path(__file__).with_name("_official_reference.py"))
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    model, info = official.load(tmp_path / "torch")
    assert not info["missing_keys"]
    for key in ("model.mm_projector.0.weight", "model.mm_projector.2.bias", "loc_decoder.2.weight"):
        assert torch.equal(model.state_dict()[key], state[key]), key


def test_export_keeps_other_files_and_refuses_stale_weights(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFLlamaConfig(**LLAMA))
    hf.save_pretrained(tmp_path / "src")
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    assert main(["convert", "src", "--out", "jax"]) == 0
    out = tmp_path / "torch"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an HF directory the weights go into
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    assert main(["export", "--checkpoint", "jax", "--out", "torch"]) == 2
    assert "already holds exported files" in capsys.readouterr().err
    assert main(["export", "--checkpoint", "jax", "--out", "torch", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask  # safetensors alone: 0600
    assert_bit_exact(load_file(str(out / "model.safetensors")), {k: v.contiguous() for k, v in hf.state_dict().items()})
    for bad in ("inf", "nan", "0"):
        assert main(["export", "--checkpoint", "jax", "--out", "x", "--shard-gib", bad]) == 2
        assert "--shard-gib must be a finite number > 0" in capsys.readouterr().err
    data = max((tmp_path / "jax" / "model").glob("**/ocdbt.process_*/d/*"), key=lambda f: f.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)  # the largest of the arrays' data files, cut short
    assert main(["export", "--checkpoint", "jax", "--out", "x"]) == 2
    assert "its saved arrays cannot be read, the files are damaged or incomplete" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # the folder it made is gone with the failed export
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
