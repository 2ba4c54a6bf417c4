"""NextChat with the SAM mask head: one mask and one IoU prediction per trigger, the seg loss joins the total,
the frozen SAM image encoder gets exactly zero gradient, and the mask head matches calling it by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxground.models.clip import ClipVisionConfig
from jaxground.models.llama import LlamaConfig
from jaxground.models.nextchat import NextChat, NextChatConfig, nextchat_loss
from jaxground.models.sam.config import SamConfig
from jaxground.tokens import TokenIds

TOK = TokenIds.after(27)
SAM = SamConfig.tiny(img_size=64, width=32, depth=1, global_attn_indexes=(0,), prompt_dim=32, decoder_mlp_dim=64,
                     iou_head_hidden_dim=32, mask_in_chans=4)
CFG = NextChatConfig(
    llm=LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                    num_kv_heads=4, max_position=32),
    vision=ClipVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2),
    tokens=TOK,
    sam=SAM,
)


def _batch():
    from jaxground.data.batch import Batch

    t = TOK
    row = [1, t.im_start, *[t.im_patch] * 4, t.im_end, 5, 6, t.at, t.boxes, 7, t.at, t.boxes, 2]
    ids = np.array([row, row], np.int32)
    labels = np.full_like(ids, -100)
    labels[:, 9:] = ids[:, 9:]
    labels[ids == t.boxes] = -100
    rng = np.random.default_rng(1)
    boxes = np.array([[[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]]] * 2, np.float32)
    masks = (rng.uniform(size=(2, 2, 32, 32)) > 0.5).astype(np.float32)
    return Batch(
        images=jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32), input_ids=jnp.asarray(ids),
        attention_mask=jnp.ones(ids.shape, bool), labels=jnp.asarray(labels), boxes=jnp.asarray(boxes),
        box_mask=jnp.ones((2, 2), bool), target_boxes=jnp.asarray(boxes), target_mask=jnp.ones((2, 2), bool),
        valid=jnp.array([True, True]), sam_images=jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32),
        masks=jnp.asarray(masks), mask_valid=jnp.array([[True, True], [True, False]]),
    )


def _model(cfg):
    """Random weights drawn on the host: eager initialisers compile once per shape (slow on 2 cores)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NextChat(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if "scale" in str(path[-1]):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape).astype(leaf.dtype))

    return nnx.merge(graphdef, jax.tree.map_with_path(draw, state))


def _grads(cfg, batch):
    graphdef, state = nnx.split(_model(cfg))

    @jax.jit
    def run(state):
        def loss_fn(state):
            out = nnx.merge(graphdef, state)(batch)
            total, parts = nextchat_loss(out, batch, w_l1=2.0, w_giou=0.2)
            return total, (out, parts)

        (total, (out, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
        model = nnx.merge(graphdef, state)
        no_sam = model(batch.replace(sam_images=None))
        by_hand = model.mask_head(out.trigger_states, out.pred_boxes, model.sam.image_encoder(batch.sam_images))
        box_only, _ = nextchat_loss(dataclasses.replace(out, mask_logits=None), batch, w_l1=2.0, w_giou=0.2)
        no_masks = no_sam.mask_logits is None and no_sam.iou_pred is None
        return total, out, parts, grads, no_masks, by_hand, box_only

    return run(state)


def test_masks_loss_and_frozen_sam_encoder():
    batch = _batch()
    total, out, parts, grads, no_masks_without_sam_images, (by_hand, iou), box_only = _grads(CFG, batch)
    g = SAM.img_size // SAM.patch_size
    assert out.mask_logits.shape == (2, 2, 4 * g, 4 * g) and out.iou_pred.shape == (2, 2)
    assert no_masks_without_sam_images
    assert np.isfinite(float(total)) and float(parts["seg"]) > 0
    np.testing.assert_allclose(float(total) - float(box_only), float(parts["seg"]), rtol=1e-5)

    flat = dict(nnx.to_flat_state(grads))
    sam_enc = [v[...] for p, v in flat.items() if p[0] == "sam"]
    assert sam_enc and all(np.all(np.asarray(x) == 0) for x in sam_enc)
    head = [v[...] for p, v in flat.items() if p[:2] == ("mask_head", "mask_decoder")]
    assert any(np.any(np.asarray(x) != 0) for x in head)
    # the same masks as calling the pieces by hand
    np.testing.assert_allclose(np.asarray(out.mask_logits), np.asarray(by_hand), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.iou_pred), np.asarray(iou), atol=1e-6)


def test_unfrozen_sam_encoder_gets_gradient():
    graphdef, state = nnx.split(_model(dataclasses.replace(CFG, freeze_sam=False)))
    batch = _batch()
    states = jnp.ones((2, 2, CFG.llm.hidden_size))

    def mask_sum(state):
        return jnp.sum(nnx.merge(graphdef, state).segment(batch.sam_images, states, batch.target_boxes)[0])

    grads = jax.jit(jax.grad(mask_sum))(state)
    sam_enc = [v[...] for p, v in nnx.to_flat_state(grads) if p[0] == "sam"]
    assert sam_enc and any(np.any(np.asarray(x) != 0) for x in sam_enc)
