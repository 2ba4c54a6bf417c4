"""SAM (Segment Anything) in Flax NNX: `Sam`, `SamConfig` and its parts."""

from jaxground.models.sam.config import PRESETS, SamConfig
from jaxground.models.sam.image_encoder import ImageEncoder
from jaxground.models.sam.mask_decoder import MaskDecoder
from jaxground.models.sam.prompt_encoder import PromptEncoder
from jaxground.models.sam.sam import Sam

__all__ = ["PRESETS", "ImageEncoder", "MaskDecoder", "PromptEncoder", "Sam", "SamConfig"]
