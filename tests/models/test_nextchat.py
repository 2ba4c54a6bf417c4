"""The NextChat assembly on a tiny random model: placement of image features and box embeddings, trigger
gathering, a finite loss, and where gradients go (exactly zero for the frozen vision tower)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxground.data.batch import Batch
from jaxground.models.clip import ClipVisionConfig
from jaxground.models.llama import LlamaConfig
from jaxground.models.nextchat import NextChat, NextChatConfig, nextchat_loss
from jaxground.ops.losses import DET_PRESETS
from jaxground.tokens import TokenIds

TOK = TokenIds.after(59)  # a small base vocabulary with the 5 special tokens appended: 59..63
CFG = NextChatConfig(
    llm=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                    num_kv_heads=2, max_position=64),
    vision=ClipVisionConfig(image_size=16, patch_size=8, hidden_size=24, intermediate_size=48, num_layers=2,
                            num_heads=2, select_layer=-2),
    tokens=TOK,
)
P = 4  # (16 / 8) ** 2 patches


def _batch() -> Batch:
    t = TOK
    prompt = [1, t.im_start, *[t.im_patch] * P, t.im_end, 7, t.boxes, 8]
    row0 = prompt + [9, t.at, t.boxes, 10, t.at, t.boxes, 2]  # question box, two answer boxes
    row1 = [1, t.im_start, *[t.im_patch] * P, t.im_end, 11, 12, t.at, t.boxes, 2]
    lengths = np.array([len(row0), len(row1)])
    ids = np.array([row0, row1 + [t.pad] * (len(row0) - len(row1))], np.int32)
    labels = np.full_like(ids, -100)
    labels[0, len(prompt):] = ids[0, len(prompt):]  # answer: 9 <at> <boxes> 10 <at> <boxes> </s>
    labels[1, 8:12] = ids[1, 8:12]  # answer: 12 <at> <boxes> </s>
    labels[ids == t.boxes] = -100  # <boxes> is never a target
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, (2, 3, 2, 2))
    boxes = np.concatenate([xy.min(2), xy.max(2)], -1).astype(np.float32)
    box_mask = np.array([[True, True, True], [True, False, False]])
    boxes[~box_mask] = 0
    # targets: the boxes of the answer's <boxes>, in trigger order
    target_boxes = np.stack([boxes[0, 1:3], np.stack([boxes[1, 0], np.zeros(4, np.float32)])])
    return Batch(
        images=jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32),
        input_ids=jnp.asarray(ids),
        attention_mask=jnp.asarray(np.arange(ids.shape[1])[None] < lengths[:, None]),
        labels=jnp.asarray(labels),
        boxes=jnp.asarray(boxes),
        box_mask=jnp.asarray(box_mask),
        target_boxes=jnp.asarray(target_boxes),
        target_mask=jnp.asarray([[True, True], [True, False]]),
        valid=jnp.asarray([True, True]),
    )


@pytest.fixture(scope="module")
def model():
    """Random weights drawn on the host: compiling the initialisers (eagerly or under jit) costs more CPU
    seconds than the rest of this file."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NextChat(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if "scale" in str(path[-1]):  # norm scales
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape).astype(leaf.dtype))

    return nnx.merge(graphdef, jax.tree.map_with_path(draw, state))


@pytest.fixture(scope="module")
def run(model):
    """One compiled call: the loss, its gradients, and the intermediate pieces the tests compare."""
    batch = _batch()

    def loss_fn(m):
        out = m(batch)
        w_l1, w_giou = DET_PRESETS["released"]
        total, parts = nextchat_loss(out, batch, w_l1=w_l1, w_giou=w_giou)
        g = m.loc_encoder(batch.boxes)
        pieces = {
            "embeds": m.embed_inputs(batch.input_ids, batch.images, batch.boxes, batch.box_mask),
            "feats": m.encode_image(batch.images),
            "tokens": m.llm.embed(batch.input_ids),
            "g": g,
            "f_of_g": m.loc_decoder(g),
            "f_of_hidden": m.loc_decoder(out.hidden),
        }
        return total, (parts, out, pieces)

    (total, (parts, out, pieces)), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    return batch, total, parts, out, jax.tree.map(np.asarray, pieces), grads


def test_placement_and_trigger_gathering(run):
    batch, _, _, out, p, _ = run
    ids = np.asarray(batch.input_ids)
    for b in range(2):
        patch_pos = np.flatnonzero(ids[b] == TOK.im_patch)
        np.testing.assert_allclose(p["embeds"][b, patch_pos], p["feats"][b], atol=1e-6)
        box_pos = np.flatnonzero(ids[b] == TOK.boxes)
        np.testing.assert_allclose(p["embeds"][b, box_pos], p["g"][b, : len(box_pos)], atol=1e-6)
        other = np.setdiff1d(np.arange(ids.shape[1]), np.concatenate([patch_pos, box_pos]))
        np.testing.assert_allclose(p["embeds"][b, other], p["tokens"][b, other], atol=0)

    np.testing.assert_array_equal(out.trigger_mask, [[True, True], [True, False]])
    at0 = np.flatnonzero(ids[0] == TOK.at)
    np.testing.assert_allclose(out.trigger_states[0], out.hidden[0, at0], atol=0)
    np.testing.assert_allclose(out.pred_boxes[0], p["f_of_hidden"][0, at0], atol=1e-6)
    assert np.abs(np.asarray(out.trigger_states[1, 1])).sum() == 0.0
    assert out.logits.shape == (2, 17, 64) and out.encode_of_decode.shape == (2, 2, 32)
    np.testing.assert_allclose(out.decode_of_encode, p["f_of_g"], atol=1e-6)


def _norm(tree) -> float:
    return float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(tree)))


def test_loss_finite_and_gradients(run):
    _, total, parts, _, _, grads = run
    assert np.isfinite(float(total)) and all(np.isfinite(float(v)) for v in parts.values())
    assert float(parts["n_tokens"]) == 5 + 3  # answer tokens but <boxes>: 7 - 2 in row 0, 4 - 1 in row 1
    assert float(parts["det"]) > 0 and float(parts["cyc_box"]) > 0 and float(parts["cyc_emb"]) > 0
    for name in ("loc_encoder", "loc_decoder", "projector", "llm"):
        assert _norm(getattr(grads, name)) > 0, name
    assert _norm(grads.vision) == 0.0  # frozen tower: exactly zero


def test_unfrozen_vision_gets_gradient(model):
    """The switch that makes the zero above meaningful: without freezing, the tower does get gradient."""
    images = _batch().images
    m = nnx.clone(model)
    m.cfg = dataclasses.replace(CFG, freeze_vision=False)
    grads = nnx.jit(nnx.grad(lambda m_: jnp.sum(m_.encode_image(images) ** 2)))(m)
    assert _norm(grads.vision) > 0


def test_bad_inputs_are_refused(model):
    batch = _batch()
    with pytest.raises(ValueError, match="images"):
        model(batch.replace(images=batch.images[:, :8]))
    with pytest.raises(ValueError, match="<im_patch>"):
        model(batch.replace(input_ids=batch.input_ids.at[0, 3].set(5)))
    with pytest.raises(ValueError, match="triggers"):
        model(batch.replace(target_boxes=batch.target_boxes[:, :1], target_mask=batch.target_mask[:, :1]))
    with pytest.raises(ValueError, match="outside the LLM vocabulary"):
        dataclasses.replace(CFG, tokens=TokenIds())


@pytest.mark.parametrize("k", [5, 9])
def test_label_tokens_same_loss_and_gradients(model, k):
    """The LM head at the supervised positions only (row 0 has 5, row 1 has 3; k = 5 is tight, 9 pads) gives
    the full head's loss and gradients."""
    batch = _batch()
    w_l1, w_giou = DET_PRESETS["released"]

    def loss_fn(m, label_tokens):
        return nextchat_loss(m(batch, label_tokens), batch, w_l1=w_l1, w_giou=w_giou)

    full = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True), static_argnums=1)(model, 0)
    part = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True), static_argnums=1)(model, k)
    (t0, p0), g0 = full
    (t1, p1), g1 = part
    np.testing.assert_allclose(float(t1), float(t0), rtol=1e-6)
    assert float(p1["n_tokens"]) == float(p0["n_tokens"]) == 8
    np.testing.assert_allclose(float(p1["ce"]), float(p0["ce"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert model(batch, k).logits.shape == (2, k, 64)


def test_attr_head_classifies_the_vision_features_and_its_loss():
    """`attr_classes`: per CLIP patch, class logits from the vision tower's features (before the projector);
    the cross-entropy counts labelled patches (>= 0) only, and trains the tower."""
    cfg = dataclasses.replace(CFG, attr_classes=5, freeze_vision=False)
    m = nnx.jit(lambda: NextChat(cfg, rngs=nnx.Rngs(1)))()
    labels = jnp.asarray([[0, 3, -1, 4], [-1, -1, -1, 2]], jnp.int32)
    batch = _batch().replace(patch_attr=labels)
    out = nnx.jit(lambda m_, b: m_(b))(m, batch)
    feats = np.asarray(m.vision(batch.images), np.float64)
    kernel, bias = np.asarray(m.attr_head.kernel[...], np.float64), np.asarray(m.attr_head.bias[...], np.float64)
    np.testing.assert_allclose(out.attr_logits, feats @ kernel + bias, rtol=1e-5, atol=1e-5)
    x = np.asarray(out.attr_logits, np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    want = -np.mean([logp[b, p, k] for b, p, k in [(0, 0, 0), (0, 1, 3), (0, 3, 4), (1, 3, 2)]])
    w_l1, w_giou = DET_PRESETS["released"]
    base, _ = nextchat_loss(out, batch, w_l1=w_l1, w_giou=w_giou)
    total, parts = nextchat_loss(out, batch, w_l1=w_l1, w_giou=w_giou, w_attr=0.5)
    np.testing.assert_allclose(float(parts["attr"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(base) + 0.5 * want, rtol=1e-5)
    assert nnx.jit(lambda m_, b: m_(b))(m, _batch()).attr_logits is None  # no labels, no head
    grads = nnx.jit(nnx.grad(lambda m_: nextchat_loss(m_(batch), batch, w_l1=w_l1, w_giou=w_giou)[1]["attr"]))(m)
    assert _norm(grads.attr_head) > 0 and _norm(grads.vision) > 0 and _norm(grads.llm) == 0


def test_patch_head_reads_the_image_tokens_and_its_loss():
    """`patch_head`: one logit per image token, from the last hidden state at that `<im_patch>`; its BCE
    counts only rows with a target, and only when weighted."""
    cfg = dataclasses.replace(CFG, patch_head=True)
    m = nnx.jit(lambda: NextChat(cfg, rngs=nnx.Rngs(1)))()
    target = jnp.asarray([[0.0, 0.5, 1.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])  # row 1: no target (e.g. POPE)
    batch = _batch().replace(patch_target=target)
    out = nnx.jit(lambda m_, b: m_(b))(m, batch)
    ids = np.asarray(batch.input_ids)
    head = np.asarray(m.patch_head.kernel[...])[:, 0]
    for b in range(2):
        states = np.asarray(out.hidden[b, np.flatnonzero(ids[b] == TOK.im_patch)])
        np.testing.assert_allclose(out.patch_logits[b], states @ head, rtol=1e-5, atol=1e-6)
    w_l1, w_giou = DET_PRESETS["released"]
    base, _ = nextchat_loss(out, batch, w_l1=w_l1, w_giou=w_giou)
    total, parts = nextchat_loss(out, batch, w_l1=w_l1, w_giou=w_giou, w_patch=2.0)
    x, t = np.asarray(out.patch_logits[0], np.float64), np.asarray(target[0], np.float64)
    want = np.mean(-t * np.log(1 / (1 + np.exp(-x))) - (1 - t) * np.log(1 - 1 / (1 + np.exp(-x))))
    np.testing.assert_allclose(float(parts["patch"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(base) + 2.0 * want, rtol=1e-5)
    grads = nnx.jit(nnx.grad(lambda m_: nextchat_loss(m_(batch), batch, w_l1=w_l1, w_giou=w_giou, w_patch=1.0)[1]["patch"]))(m)
    assert _norm(grads.patch_head) > 0 and _norm(grads.llm) > 0
