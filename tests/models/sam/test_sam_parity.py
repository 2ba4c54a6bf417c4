"""Parity with the official `segment_anything` modules: vit_b layout (depth 12, width 768, 12 heads, global
attention at 2/5/8/11, window 14, rel-pos) at img_size 128 (the 8x8 grid pads into one 14x14 window),
every weight perturbed, float32. Measured max |diff|: features 2e-5, mask logits 1e-5 (tolerance 1e-4 both)."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxground.convert import sam as convert
from jaxground.models.sam import SamConfig

_spec = importlib.util.spec_from_file_location(
    "_sam_reference", Path(__file__).parents[2] / "_sam_reference.py"
)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

CFG = SamConfig.vit_b(img_size=128)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tsam = ref.official_sam(CFG)
    ref.perturb(tsam, scale=0.05)
    state = {k: v.detach().numpy() for k, v in tsam.state_dict().items()}
    model = convert.build(state)
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 3, 128, 128)).astype(np.float32)
    with torch.no_grad():
        feat_t = tsam.image_encoder(torch.from_numpy(img)).numpy()
    feat_j = np.asarray(
        nnx.jit(lambda m, x: m.image_encoder(x))(model, jnp.asarray(img.transpose(0, 2, 3, 1)))
    )
    return tsam, model, feat_t, feat_j


def test_config_read_from_shapes(pair):
    assert pair[1].cfg == CFG


def test_image_encoder_and_dense_pe(pair):
    tsam, model, feat_t, feat_j = pair
    assert feat_j.shape == (2, 8, 8, 256)
    np.testing.assert_allclose(feat_j, feat_t.transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    pe_t = tsam.prompt_encoder.get_dense_pe()[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(np.asarray(model.prompt_encoder.get_dense_pe()), pe_t, atol=1e-5, rtol=0)


def _prompts(rng):
    pts = rng.uniform(0, 128, (2, 3, 2, 2)).astype(np.float32)
    lab = np.array([[[1, 0], [0, -1], [1, 1]], [[-1, 1], [0, 0], [1, -1]]], np.int64)
    boxes = np.sort(rng.uniform(0, 128, (2, 3, 2, 2)), axis=2).reshape(2, 3, 4).astype(np.float32)
    masks = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    return pts, lab, boxes, masks


@pytest.mark.parametrize(
    "kind, multimask", [("points", False), ("boxes", True), ("points+boxes", False), ("boxes+masks", True)]
)
def test_mask_decoder(pair, kind, multimask):
    tsam, model, feat_t, feat_j = pair
    pts, lab, boxes, masks = _prompts(np.random.default_rng(1))
    use_p, use_b, use_m = "points" in kind, "boxes" in kind, "masks" in kind
    decode = nnx.jit(lambda m, f, p, l, b, k: m.decode(f, p, l, b, k, multimask_output=multimask))
    mj, ij = decode(
        model,
        jnp.asarray(feat_j),
        *(
            jnp.asarray(a) if u else None
            for a, u in ((pts, use_p), (lab, use_p), (boxes, use_b), (masks, use_m))
        ),
    )
    out_m, out_i = [], []
    with torch.no_grad():
        for b in range(2):
            sp, de = tsam.prompt_encoder(
                points=(torch.from_numpy(pts[b]), torch.from_numpy(lab[b])) if use_p else None,
                boxes=torch.from_numpy(boxes[b]) if use_b else None,
                masks=torch.from_numpy(masks[b][:, None]) if use_m else None,
            )
            m, i = tsam.mask_decoder(
                torch.from_numpy(feat_t[b : b + 1]), tsam.prompt_encoder.get_dense_pe(), sp, de, multimask
            )
            out_m.append(m.numpy())
            out_i.append(i.numpy())
    mt, it = np.stack(out_m), np.stack(out_i)
    assert mj.shape == mt.shape == (2, 3, 3 if multimask else 1, 32, 32)
    assert np.abs(mt).max() > 0.1  # the comparison is not between near-zero maps
    np.testing.assert_allclose(np.asarray(mj), mt, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(ij), it, atol=1e-4, rtol=0)


def test_every_norm_has_the_reference_eps(pair):
    """Each torch LayerNorm / LayerNorm2d and the JAX norm its weight converts into use the same eps: a wrong
    eps moves the outputs by less than the parity tolerance, so it is checked directly."""
    tsam, model = pair[:2]
    rules = convert.sam_rules("", hf=False)
    seen = set()
    for name, module in tsam.named_modules():
        if not hasattr(module, "eps"):
            continue
        target = next(t for ok, t in (r.match(name + ".weight") for r in rules) if ok)
        norm = model
        for part in target.removesuffix(".scale").split("."):
            norm = norm[int(part)] if part.isdigit() else getattr(norm, part)
        assert norm.epsilon == module.eps, name
        seen.add(module.eps)
    assert seen == {1e-5, 1e-6}  # both kinds were found (ViT / LayerNorm2d at 1e-6, the transformer at 1e-5)


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(1)
    tsam = ref.official_sam(SamConfig.tiny())
    ref.perturb(tsam)
    return {k: v.detach().numpy() for k, v in tsam.state_dict().items()}


def test_wrapper_prefixes_give_identical_params(tiny_state):
    base = nnx.to_flat_state(nnx.state(convert.build(tiny_state, decoder_heads=2)))
    for prefix in ("sam.model.", "model.visual_model."):
        other = nnx.to_flat_state(
            nnx.state(convert.build({prefix + k: v for k, v in tiny_state.items()}, decoder_heads=2))
        )
        for (path, a), (_, b) in zip(base, other):
            np.testing.assert_array_equal(
                np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path)
            )


def test_bad_prompt_batch_is_refused(tiny_state):
    model = convert.build(tiny_state, decoder_heads=2)
    feats = jnp.zeros((2, 8, 8, 64))
    with pytest.raises(ValueError, match="prompt batch must match the image batch"):
        model.decode(feats, boxes=jnp.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match="points and labels"):
        model.decode(feats, points=jnp.zeros((2, 3, 1, 2)))


def test_boxes_outside_the_image_match_torch(tiny_state):
    """No clipping, as in segment_anything: the released NExT-Chat prompts SAM with F's unconstrained boxes."""
    model = convert.build(tiny_state, decoder_heads=2)
    tsam = ref.official_sam(SamConfig.tiny())
    tsam.load_state_dict({k: torch.from_numpy(v) for k, v in tiny_state.items()})
    feats = np.random.default_rng(0).normal(size=(2, 8, 8, 64)).astype(np.float32)
    far = np.array([[[-500.0, -20.0, 1e4, 300.0]], [[-3.0, 10.0, 140.0, 129.0]]], np.float32)
    m_j, i_j = nnx.jit(lambda m, f, b: m.decode(f, boxes=b, multimask_output=False))(model, jnp.asarray(feats), far)
    assert np.isfinite(np.asarray(m_j)).all() and np.isfinite(np.asarray(i_j)).all()
    with torch.no_grad():
        for b in range(2):
            sparse, dense = tsam.prompt_encoder(points=None, boxes=torch.from_numpy(far[b]), masks=None)
            m_t, i_t = tsam.mask_decoder(torch.from_numpy(feats[b:b + 1].transpose(0, 3, 1, 2)),
                                         tsam.prompt_encoder.get_dense_pe(), sparse, dense, False)
            np.testing.assert_allclose(np.asarray(m_j[b]), m_t.numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(np.asarray(i_j[b]), i_t.numpy(), atol=1e-4, rtol=0)


def test_missing_key_is_reported(tiny_state):
    state = dict(tiny_state)
    state.pop("mask_decoder.iou_token.weight")
    with pytest.raises(ValueError, match="mask_decoder.iou_token"):
        convert.build(state, decoder_heads=2)
