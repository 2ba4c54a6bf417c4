"""`from_torch` for LLaMA and CLIP: from a saved HF directory (kind and config detected), from an in-memory
state dict, into a scanned model, a full CLIPModel, and one error listing every problem of a broken dict."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM
from transformers import LlamaConfig as HFLlamaConfig

from jaxground.convert import ConversionError, from_torch
from jaxground.convert.clip import clip_rules
from jaxground.convert.llama import llama_rules
from jaxground.models.clip import ClipVision
from jaxground.models.llama import Llama

LLAMA = {
    "vocab_size": 45,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    "attn_implementation": "eager",
}
VISION = {
    "image_size": 28,
    "patch_size": 14,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "attn_implementation": "eager",
}


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(HFLlamaConfig(**LLAMA)).eval()


def _llama_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_llama_from_saved_directory(llama, tmp_path):
    llama.save_pretrained(tmp_path)
    model = from_torch(tmp_path)  # kind and config.json detected
    assert isinstance(model, Llama) and model.cfg.num_kv_heads == 2
    ids = np.array([[1, 5, 44, 7]], np.int32)
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - _llama_logits(llama, ids)).max() <= 1e-5


def test_llama_from_state_dict_into_scanned_model(llama):
    model = from_torch(llama.state_dict(), kind="llama", config=llama.config.to_dict(), scan_layers=True)
    np.testing.assert_array_equal(
        np.asarray(model.layers.k.kernel[1]), llama.model.layers[1].self_attn.k_proj.weight.detach().numpy().T
    )
    ids = np.array([[3, 2, 1]], np.int32)
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - _llama_logits(llama, ids)).max() <= 1e-5


def test_broken_llama_state_dict_lists_every_problem(llama):
    state = dict(llama.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 16)
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as e:
        from_torch(state, kind="llama", config=llama.config)
    assert e.value.missing == [
        "layers.0.k.kernel",
        "layers.1.up.kernel",
    ]  # a mis-shaped key leaves its target unset
    assert e.value.unexpected == ["model.layers.0.self_attn.extra.weight"]
    assert len(e.value.misshaped) == 1 and "k_proj" in e.value.misshaped[0] and "(16, 8)" in str(e.value)
    # scanned target: a missing layer is reported as missing rows of the stacked parameter
    with pytest.raises(ConversionError, match=r"layers.up.kernel rows \[1\]"):
        from_torch(state, kind="llama", config=llama.config, scan_layers=True)


def test_rule_tables_take_prefixes(llama):
    rules = llama_rules("model.", target_prefix="llm.")
    assert any(
        r.match("model.layers.3.self_attn.o_proj.weight") == (True, "llm.layers.3.o.kernel") for r in rules
    )
    assert any(
        r.match("model.layers.3.mlp.down_proj.weight") == (True, "llm.layers.3.down.kernel") for r in rules
    )
    assert any(r.match("lm_head.weight") == (True, "llm.lm_head.kernel") for r in rules)
    assert any(
        r.match("model.layers.0.input_layernorm.weight") == (True, "llm.layers.input_norm.scale[0]")
        for r in llama_rules("model.", target_prefix="llm.", scan=True)
    )
    vision = clip_rules("model.vision_tower.vision_tower.", target_prefix="vision.")
    key = "model.vision_tower.vision_tower.vision_model.encoder.layers.4.self_attn.out_proj.bias"
    assert any(r.match(key) == (True, "vision.layers.4.o.bias") for r in vision)


@pytest.mark.parametrize("full", [False, True])
def test_clip_from_saved_directory(tmp_path, full):
    torch.manual_seed(0)
    if full:
        text = {
            "vocab_size": 30,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        }
        hf = CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=8)).eval()
        tower = hf.vision_model
    else:
        hf = tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    hf.save_pretrained(tmp_path)
    model = from_torch(tmp_path)
    assert isinstance(model, ClipVision)
    pixels = np.random.default_rng(0).normal(size=(1, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tower(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    assert np.abs(np.asarray(model(jnp.asarray(pixels))) - ref.hidden_states[-2][:, 1:].numpy()).max() <= 1e-5


def test_broken_clip_state_dict_lists_every_problem():
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(**VISION))
    state = dict(hf.state_dict())
    del state["embeddings.class_embedding"]
    del state["encoder.layers.1.mlp.fc2.bias"]
    state["pre_layrnorm.weight"] = torch.zeros(17)
    with pytest.raises(ConversionError) as e:
        from_torch(state, kind="clip", config=hf.config)
    assert e.value.missing == ["class_embedding", "layers.1.fc2.bias", "pre_layrnorm.scale"]
    assert len(e.value.misshaped) == 1 and "pre_layrnorm" in e.value.misshaped[0]
    # sin-cos positions: the checkpoint's position table is dropped, not reported
    model = from_torch(hf.state_dict(), kind="clip", config=hf.config, position_embedding="sincos")
    assert not hasattr(model, "position_embedding")
