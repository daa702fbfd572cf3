"""SAM-Med2D network modules, one concept per file."""

from .adapter import Adapter
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam_med2d import SamMed2D
from .transformer import TwoWayTransformer

__all__ = ["Adapter", "ImageEncoderViT", "MaskDecoder", "PromptEncoder", "SamMed2D", "TwoWayTransformer"]
