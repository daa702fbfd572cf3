"""Build a SAM-Med2D network from a config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, SamMed2D, TwoWayTransformer
from lib.modeling.config import SamMed2DConfig, resolve_config


def build_model(config: str | Path | Mapping[str, Any] | SamMed2DConfig = "vit_b") -> SamMed2D:
    """A freshly initialised SAM-Med2D (``vit_b``, ``vit_l``, ``vit_h``, a config dict or a JSON path)."""
    cfg = resolve_config(config)
    if cfg.encoder_embed_dim % cfg.encoder_num_heads:
        raise ValueError(f"encoder_embed_dim {cfg.encoder_embed_dim} not divisible by {cfg.encoder_num_heads} heads")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    grid = cfg.embedding_size
    image_encoder = ImageEncoderViT(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.encoder_embed_dim,
        depth=cfg.encoder_depth,
        num_heads=cfg.encoder_num_heads,
        out_chans=cfg.prompt_embed_dim,
        window_size=cfg.window_size,
        global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
        adapter=cfg.encoder_adapter,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=cfg.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=cfg.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=cfg.decoder_transformer_depth,
            embedding_dim=cfg.prompt_embed_dim,
            num_heads=cfg.decoder_num_heads,
            mlp_dim=cfg.decoder_mlp_dim,
        ),
        num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    return SamMed2D(cfg, image_encoder, prompt_encoder, mask_decoder)
