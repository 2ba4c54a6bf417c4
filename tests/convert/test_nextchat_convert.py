"""A tiny checkpoint in the released NExT-Chat layout (HF LlamaForCausalLM + HF CLIPVisionModel + official SAM +
the MLPs under their official names) -> jaxground, compared with a PyTorch reference forward written here:
CLIP layer -2 without CLS -> projector -> `<im_patch>` slots, loc_encoder at `<boxes>`, LLaMA, loc_decoder at `<at>`,
seg_prompt_mlp + SAM box prompt -> SAM mask decoder. float32; logits and boxes within 1e-4, masks within 1e-5."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM
from transformers import LlamaConfig as HFLlamaConfig

from jaxground.convert import detect_kind, from_torch
from jaxground.data.batch import Batch
from jaxground.models.sam import SamConfig

_spec = importlib.util.spec_from_file_location("_sam_reference", Path(__file__).parents[1] / "_sam_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

BASE, H = 45, 32
AT, BOXES, IM_PATCH, IM_START, IM_END = BASE + 3, BASE + 4, BASE, BASE + 1, BASE + 2
LLAMA = dict(vocab_size=BASE + 5, hidden_size=H, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
# head dim 64 as in every OpenAI CLIP: the converter reads the tower's config off its weights
VISION = dict(image_size=28, patch_size=14, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=1, attn_implementation="eager")
SAM = SamConfig.tiny(decoder_heads=8)  # official SAMs all use 8 (not visible in shapes)


def _seq(*dims):
    return torch.nn.Sequential(torch.nn.Linear(dims[0], dims[1]), torch.nn.ReLU() if len(dims) == 3 else
                               torch.nn.GELU(), torch.nn.Linear(dims[1], dims[-1]))


@pytest.fixture(scope="module")
def torch_parts():
    torch.manual_seed(0)
    parts = dict(
        llama=LlamaForCausalLM(HFLlamaConfig(**LLAMA)).eval(),
        clip=CLIPVisionModel(CLIPVisionConfig(**VISION)).eval(),
        projector=torch.nn.Sequential(torch.nn.Linear(64, H), torch.nn.GELU(), torch.nn.Linear(H, H)),
        loc_encoder=_seq(4, H // 2, H), loc_decoder=_seq(H, H // 2, 4), seg_prompt_mlp=_seq(H, H, 4 * SAM.prompt_dim),
        sam=ref.official_sam(SAM),
    )
    ref.perturb(parts["sam"], scale=0.1)
    with torch.no_grad():  # HF zero-inits biases / unit norms: perturb so that a mapping bug cannot hide
        for name in ("llama", "clip"):
            for p in parts[name].parameters():
                p.add_(torch.randn(p.shape) * 0.05)
    return parts


def released_state(parts, *, with_sam=True) -> dict:
    state = {k: v for k, v in parts["llama"].state_dict().items()}
    state |= {f"model.vision_tower.{k if k.startswith('vision_model.') else 'vision_model.' + k}": v
              for k, v in parts["clip"].state_dict().items()}
    state |= {f"model.mm_projector.{k}": v for k, v in parts["projector"].state_dict().items()}
    for name in ("loc_encoder", "loc_decoder") + (("seg_prompt_mlp",) if with_sam else ()):
        state |= {f"{name}.{k}": v for k, v in parts[name].state_dict().items()}
    if with_sam:
        state |= {f"sam.model.{k}": v for k, v in parts["sam"].state_dict().items()}
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_released(parts, directory: Path, *, with_sam=True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(released_state(parts, with_sam=with_sam), str(directory / "model.safetensors"))
    config = parts["llama"].config.to_dict() | dict(model_type="nextchat", mm_depth=2, mm_hidden_size=64,
                                                     mm_vision_select_layer=-2, use_mm_proj=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def inputs():
    rng = np.random.default_rng(0)
    ids = np.array([[1, IM_START, *[IM_PATCH] * 4, IM_END, 5, 7, AT, BOXES, 9, 11, AT, BOXES, 3, AT, BOXES, 2]], np.int32)
    labels = np.full_like(ids, -100)
    labels[0, 13:] = ids[0, 13:]  # the answer: its two <at> are triggers, the question's is not
    image = rng.normal(size=(1, 3, 28, 28)).astype(np.float32)
    boxes = np.array([[[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.8], [0.0, 0.0, 0.0, 0.0]]], np.float32)
    sam_image = rng.normal(size=(1, 3, SAM.img_size, SAM.img_size)).astype(np.float32)
    return ids, labels, image, boxes, sam_image


def torch_reference(parts, ids, labels, image, boxes, sam_image=None):
    """(logits [1,T,V], trigger states [Q,D], boxes [Q,4], masks [Q,4g,4g] or None) the NExT-Chat way."""
    llama, ids_t = parts["llama"], torch.from_numpy(ids).long()
    with torch.no_grad():
        feats = parts["clip"](torch.from_numpy(image), output_hidden_states=True).hidden_states[-2][:, 1:]
        embeds = llama.model.embed_tokens(ids_t).clone()
        embeds[ids_t == IM_PATCH] = parts["projector"](feats)[0]
        n_boxes = int((ids_t == BOXES).sum())
        embeds[ids_t == BOXES] = parts["loc_encoder"](torch.from_numpy(boxes[0, :n_boxes]))
        out = llama(inputs_embeds=embeds, output_hidden_states=True)
        trigger = (ids_t == AT) & (torch.from_numpy(labels) == AT)
        states = out.hidden_states[-1][trigger]
        pred = parts["loc_decoder"](states)
        masks = None
        if sam_image is not None:
            sam = parts["sam"]
            emb = sam.image_encoder(torch.from_numpy(sam_image))
            prompts = parts["seg_prompt_mlp"](states).view(states.shape[0], 4, SAM.prompt_dim)
            box_emb, dense = sam.prompt_encoder(points=None, boxes=pred * SAM.img_size, masks=None)
            m, _ = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), torch.cat([prompts, box_emb], 1), dense,
                                    False)
            masks = m[:, 0].numpy()
    return out.logits.numpy(), states.numpy(), pred.numpy(), masks


def jax_forward(model, ids, labels, image, boxes):
    q = boxes.shape[1]
    batch = Batch(images=jnp.asarray(image.transpose(0, 2, 3, 1)), input_ids=jnp.asarray(ids),
                  attention_mask=jnp.ones(ids.shape, bool), labels=jnp.asarray(labels), boxes=jnp.asarray(boxes),
                  box_mask=jnp.asarray([[True, True, True]]), target_boxes=jnp.zeros((1, q, 4)),
                  target_mask=jnp.ones((1, q), bool), valid=jnp.ones((1,), bool))
    return nnx.jit(lambda m, b: m(b))(model, batch)


@nnx.jit
def _masks(model, states, boxes, sam_images):
    return model.mask_head(states, boxes, model.sam.image_encoder(sam_images))[0]


def masks_of(model, states, boxes, sam_image):
    """Mask logits [B,Q,4g,4g] from a model holding `sam` (image encoder) and `mask_head`."""
    return _masks(model, jnp.asarray(states), jnp.asarray(boxes), jnp.asarray(sam_image.transpose(0, 2, 3, 1)))


def test_released_llm_part_matches_torch(torch_parts, tmp_path):
    source = save_released(torch_parts, tmp_path / "nextchat", with_sam=False)
    assert detect_kind(source) == "nextchat"
    model = from_torch(source)
    assert model.cfg.projector == "mlp2x_gelu" and model.cfg.vision.num_heads == 1 and model.cfg.tokens.at == AT
    ids, labels, image, boxes, _ = inputs()
    logits, _, pred, _ = torch_reference(torch_parts, ids, labels, image, boxes)
    out = jax_forward(model, ids, labels, image, boxes)
    assert np.abs(np.asarray(out.logits) - logits).max() <= 1e-4
    assert np.asarray(out.trigger_mask).tolist() == [[True, True, False]]
    assert np.abs(np.asarray(out.pred_boxes[0, :2]) - pred).max() <= 1e-4
    assert np.abs(pred - pred.mean(0)).max() > 1e-3  # the two boxes differ: F sees different states


def test_released_full_checkpoint_with_sam(torch_parts, tmp_path):
    from jaxground.cli import main
    from jaxground.convert.store import load_converted

    source = save_released(torch_parts, tmp_path / "nextchat")
    assert main(["convert", str(source), "--out", str(tmp_path / "out")]) == 0
    model, cfg = load_converted(tmp_path / "out")
    assert cfg.sam == dataclasses.replace(SAM)
    ids, labels, image, boxes, sam_image = inputs()
    logits, _, pred, masks = torch_reference(torch_parts, ids, labels, image, boxes, sam_image)
    out = jax_forward(model, ids, labels, image, boxes)
    assert np.abs(np.asarray(out.logits) - logits).max() <= 1e-4
    assert np.abs(np.asarray(out.pred_boxes[0, :2]) - pred).max() <= 1e-4
    assert (pred < 0).any()  # F's random boxes reach outside the image: SAM must encode them unclipped, as torch
    got = masks_of(model, out.trigger_states[:, :2], out.pred_boxes[:, :2], sam_image)
    assert np.abs(np.asarray(got[0]) - masks).max() <= 1e-5  # measured 1e-6


def official_new_rows(base, patch_in, patch_out):
    """The official `initialize_vision_tokenizer` on a copy of `base`: `<im_patch>` added alone by
    resize_token_embeddings (its random rows set to ours: the draw is another generator's), then 4 more tokens
    whose rows, input and output, are the mean of `[:-4]`."""
    import copy

    ref = copy.deepcopy(base)
    ref.resize_token_embeddings(BASE + 1)
    with torch.no_grad():
        ref.model.embed_tokens.weight[BASE] = torch.tensor(patch_in)
        ref.lm_head.weight[BASE] = torch.tensor(patch_out)
        ref.resize_token_embeddings(BASE + 5)
        for table in (ref.model.embed_tokens.weight, ref.lm_head.weight):
            table[-4:] = table[:-4].mean(dim=0, keepdim=True)
    return ref.requires_grad_(False)


def test_compose_vicuna_clip_sam(torch_parts, tmp_path):
    """LLaMA dir + CLIP dir + SAM .pth -> NExT-Chat with fresh heads and new token rows initialised as the official
    code does; its export layout is the released one."""
    from jaxground.convert.command import convert
    from jaxground.convert.store import load_converted, read_layout

    base = LlamaForCausalLM(HFLlamaConfig(**(LLAMA | dict(vocab_size=BASE)))).eval()
    base.save_pretrained(tmp_path / "vicuna")
    torch_parts["clip"].save_pretrained(tmp_path / "clip")
    torch.save(torch_parts["sam"].state_dict(), tmp_path / "sam.pth")
    convert([tmp_path / "vicuna", tmp_path / "clip", tmp_path / "sam.pth"], tmp_path / "out", quiet=True)
    model, cfg = load_converted(tmp_path / "out")
    assert cfg.llm.vocab_size == BASE + 5 and cfg.tokens.at == AT and cfg.sam == SAM and cfg.vision.select_layer == -2
    emb, head = np.asarray(model.llm.embed_tokens.embedding[...]), np.asarray(model.llm.lm_head.kernel[...]).T
    official = official_new_rows(base, emb[BASE], head[BASE])
    np.testing.assert_allclose(emb, official.model.embed_tokens.weight.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(head, official.lm_head.weight.numpy(), rtol=1e-5, atol=1e-7)
    for row in (emb[BASE], head[BASE]):  # <im_patch>: N(0, initializer_range 0.02), drawn apart for each table
        assert 0.01 < row.std() < 0.03 and abs(row.mean()) < 0.015
    assert not np.array_equal(emb[BASE], head[BASE])
    np.testing.assert_array_equal(np.asarray(model.mask_head.mask_decoder.iou_token[...]),
                                  torch_parts["sam"].mask_decoder.iou_token.weight.detach().numpy())
    assert float(jnp.abs(model.loc_decoder.fc1.kernel[...]).max()) > 0  # fresh heads are initialised, not empty
    keys = {e["key"] for e in read_layout(tmp_path / "out")}
    assert keys == set(released_state(torch_parts)) - {"model.vision_tower.vision_model.post_layernorm.weight",
                                                       "model.vision_tower.vision_model.post_layernorm.bias"}


def test_select_layer_defaults_as_the_official_code(torch_parts):
    """A config.json without `mm_vision_select_layer` means -1: `getattr(self.config, "mm_vision_select_layer", -1)`."""
    from jaxground.convert.nextchat import released_config

    shapes = {k: tuple(v.shape) for k, v in released_state(torch_parts, with_sam=False).items()}
    hf = torch_parts["llama"].config.to_dict() | {"model_type": "nextchat", "mm_depth": 2}
    assert released_config(shapes, hf).vision.select_layer == -1


def test_new_token_rows_are_seeded():
    from jaxground.convert.nextchat import PadRows
    from jaxground.convert.table import identity

    x = np.random.default_rng(0).normal(size=(BASE, H)).astype(np.float32)
    rows = [PadRows(identity, 5, seed)(x)[BASE] for seed in ((0, 0), (0, 0), (1, 0), (0, 1))]
    assert np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[0], rows[2])
    assert not np.array_equal(rows[0], rows[3])
