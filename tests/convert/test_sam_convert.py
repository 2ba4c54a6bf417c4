"""The converter on HF `SamModel` names: the same perturbed weights under HF names (checked complete by a strict
load into `transformers.SamModel`) give identical JAX parameters and outputs; detection and prefixes."""

import importlib.util
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from jaxground.convert import detect_kind
from jaxground.convert import sam as convert
from jaxground.models.sam import SamConfig

_spec = importlib.util.spec_from_file_location(
    "_sam_reference", Path(__file__).parents[1] / "_sam_reference.py"
)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

_HF_NAMES = [  # official -> HF, applied in order (a test-side table, independent of the converter's)
    (r"^image_encoder\.", "vision_encoder."),
    (r"patch_embed\.proj\.", "patch_embed.projection."),
    (r"vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"(layers\.\d+\.)norm(\d)", r"\1layer_norm\2"),
    (r"neck\.0\.", "neck.conv1."),
    (r"neck\.1\.", "neck.layer_norm1."),
    (r"neck\.2\.", "neck.conv2."),
    (r"neck\.3\.", "neck.layer_norm2."),
    (r"pe_layer\.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    (r"point_embeddings\.", "point_embed."),
    (r"mask_downscaling\.0\.", "mask_embed.conv1."),
    (r"mask_downscaling\.1\.", "mask_embed.layer_norm1."),
    (r"mask_downscaling\.3\.", "mask_embed.conv2."),
    (r"mask_downscaling\.4\.", "mask_embed.layer_norm2."),
    (r"mask_downscaling\.6\.", "mask_embed.conv3."),
    (r"norm_final_attn", "layer_norm_final_attn"),
    (r"output_upscaling\.0\.", "upscale_conv1."),
    (r"output_upscaling\.1\.", "upscale_layer_norm."),
    (r"output_upscaling\.3\.", "upscale_conv2."),
    (r"(mlps\.\d+\.|iou_prediction_head\.)layers\.0\.", r"\1proj_in."),
    (r"(mlps\.\d+\.|iou_prediction_head\.)layers\.2\.", r"\1proj_out."),
    (r"(mlps\.\d+\.|iou_prediction_head\.)layers\.1\.", r"\1layers.0."),
]


def _to_hf(state):
    out = {}
    for k, v in state.items():
        for pat, rep in _HF_NAMES:
            k = re.sub(pat, rep, k)
        out[k] = v
    out["shared_image_embedding.positional_embedding"] = out[
        "prompt_encoder.shared_embedding.positional_embedding"
    ]
    return out


def test_hf_names_give_identical_params_and_outputs():
    from transformers import SamConfig as HFConfig
    from transformers import SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    cfg = SamConfig.tiny()
    torch.manual_seed(0)
    tsam = ref.official_sam(cfg)
    ref.perturb(tsam)
    official = {k: v.detach().numpy() for k, v in tsam.state_dict().items()}
    hf_state = _to_hf(official)
    hf = SamModel(
        HFConfig(
            vision_config=SamVisionConfig(
                hidden_size=cfg.width,
                num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.num_heads,
                image_size=cfg.img_size,
                output_channels=cfg.prompt_dim,
                window_size=cfg.window_size,
                global_attn_indexes=list(cfg.global_attn_indexes),
                mlp_dim=cfg.width * 4,
                num_pos_feats=cfg.prompt_dim // 2,
            ),
            prompt_encoder_config=SamPromptEncoderConfig(
                hidden_size=cfg.prompt_dim, image_size=cfg.img_size, mask_input_channels=cfg.mask_in_chans
            ),
            mask_decoder_config=SamMaskDecoderConfig(
                hidden_size=cfg.prompt_dim,
                num_attention_heads=cfg.decoder_heads,
                mlp_dim=cfg.decoder_mlp_dim,
                iou_head_hidden_dim=cfg.iou_head_hidden_dim,
            ),
        )
    )
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in hf_state.items()}, strict=True)  # names complete

    assert detect_kind(hf_state) == "sam" and detect_kind(official) == "sam"
    a = convert.build(official, decoder_heads=cfg.decoder_heads)
    b = convert.build(
        {"model.visual_model." + k: v for k, v in hf_state.items()}, decoder_heads=cfg.decoder_heads
    )
    assert a.cfg == b.cfg == cfg
    for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(path))

    img = np.random.default_rng(0).standard_normal((1, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    with torch.no_grad():
        feat_hf = hf.get_image_embeddings(torch.from_numpy(img)).numpy().transpose(0, 2, 3, 1)
    feat = np.asarray(b.image_encoder(jnp.asarray(img.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(feat, feat_hf, atol=1e-4, rtol=0)
