"""CLIP ViT vision tower (as in LLaVA / NExT-Chat): patch features of one hidden layer, CLS dropped.

Axes: B batch, I image side (pixels), C channels (3), P patches, D model dim, N heads, H head dim, F mlp dim.
Hidden state k (HF `hidden_states[k]`) is the pre-LayerNorm embedding for k = 0 and the output of layer k
after; `select_layer` picks one (-2 = second-to-last layer, LLaVA's default), and only the layers up to it run.
The layers after it are kept as parameters so that a checkpoint loads and exports unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxground.models.layers import check_sizes_and_dtypes, layer_norm, linear, softmax


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    select_layer: int = -2
    position_embedding: str = "learned"  # or "sincos": fixed 2-D sin-cos patch positions, no parameter
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_sizes_and_dtypes(self, ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers",
                                      "num_heads"))
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.position_embedding not in ("learned", "sincos"):
            raise ValueError(
                f"position_embedding must be 'learned' or 'sincos', got {self.position_embedding!r}"
            )
        if self.position_embedding == "sincos" and self.hidden_size % 4:
            raise ValueError(f"sincos positions need hidden_size divisible by 4, got {self.hidden_size}")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ValueError(
                f"select_layer {self.select_layer} is outside hidden states 0..{self.num_layers}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def layers_run(self) -> int:
        """How many layers produce the selected hidden state."""
        return self.select_layer % (self.num_layers + 1)

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> ClipVisionConfig:
        """From an HF `CLIPVisionConfig` or a full `CLIPConfig` (object or dict; its `vision_config` is used)."""
        c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        c = c.get("vision_config") or c
        if c.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"only quick_gelu CLIP towers are supported, got {c['hidden_act']!r}")
        if c.get("num_channels", 3) != 3:
            raise ValueError(f"only 3-channel images are supported, got num_channels={c['num_channels']}")
        fields = {
            "image_size": c["image_size"],
            "patch_size": c["patch_size"],
            "hidden_size": c["hidden_size"],
            "intermediate_size": c["intermediate_size"],
            "num_layers": c["num_hidden_layers"],
            "num_heads": c["num_attention_heads"],
            "layer_norm_eps": c.get("layer_norm_eps", 1e-5),
        }
        return cls(**(fields | overrides))


def sincos_positions(grid: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos positions [grid*grid, dim]: first half encodes the row, second half the column."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * omega[None]
        parts += [np.sin(angles), np.cos(angles)]
    return np.concatenate(parts, axis=1).astype(np.float32)


class ClipBlock(nnx.Module):
    """Pre-norm encoder layer with biased projections and quick-GELU MLP."""

    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = {"rngs": rngs, "dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        self.heads = cfg.num_heads
        self.layer_norm1 = layer_norm(d, eps=cfg.layer_norm_eps, **kw)
        self.q = linear(d, d, ("embed", "heads"), **kw)
        self.k = linear(d, d, ("embed", "heads"), **kw)
        self.v = linear(d, d, ("embed", "heads"), **kw)
        self.o = linear(d, d, ("heads", "embed"), **kw)
        self.layer_norm2 = layer_norm(d, eps=cfg.layer_norm_eps, **kw)
        self.fc1 = linear(d, f, ("embed", "mlp"), **kw)
        self.fc2 = linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B,P,D] -> [B,P,D] (P here includes the CLS token)."""
        b, p, d = x.shape
        h = self.layer_norm1(x)
        q, k, v = (proj(h).reshape(b, p, self.heads, d // self.heads) for proj in (self.q, self.k, self.v))
        scores = (
            jnp.einsum("BPNH,BQNH->BNPQ", q, k, preferred_element_type=jnp.float32)
            * (d // self.heads) ** -0.5
        )
        probs = softmax(scores, axis=-1).astype(v.dtype)
        x = x + self.o(jnp.einsum("BNPQ,BQNH->BPNH", probs, v).reshape(b, p, d))
        h = self.fc1(self.layer_norm2(x))
        return x + self.fc2(h * jax.nn.sigmoid(1.702 * h))


class ClipVision(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.patch_embedding = nnx.Conv(
            3,
            d,
            (cfg.patch_size,) * 2,
            strides=cfg.patch_size,
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
            rngs=rngs,
        )
        self.class_embedding = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (d,), param_dtype), out_sharding=("embed",)
        )
        if cfg.position_embedding == "learned":
            self.position_embedding = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (cfg.num_patches + 1, d), param_dtype),
                out_sharding=(None, "embed"),
            )
        self.pre_layrnorm = layer_norm(
            d, eps=cfg.layer_norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.layers = nnx.List([ClipBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def positions(self) -> jax.Array:
        """[P+1, D] position embeddings, CLS first (a zero vector for sin-cos)."""
        if self.cfg.position_embedding == "learned":
            return self.position_embedding[...]
        grid = sincos_positions(self.cfg.grid, self.cfg.hidden_size)
        return jnp.asarray(np.concatenate([np.zeros_like(grid[:1]), grid]))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels float[B,I,I,C] (CLIP-normalised) -> features [B,P,D] of `select_layer`, CLS dropped."""
        c = self.cfg
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (c.image_size, c.image_size, 3):
            raise ValueError(
                f"pixels must be [B,{c.image_size},{c.image_size},3] (channels last), got {tuple(pixels.shape)}"
            )
        dtype = jnp.dtype(c.dtype)
        x = self.patch_embedding(pixels.astype(dtype))  # [B,g,g,D]
        b = x.shape[0]
        x = x.reshape(b, c.num_patches, c.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.positions().astype(dtype)
        x = self.pre_layrnorm(x)
        for block in self.layers[: c.layers_run]:
            x = block(x)
        return x[:, 1:]
