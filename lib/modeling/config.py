"""Model configuration: the named SAM-Med2D sizes and any dict with the same keys.

The keys are those of ``shared/spec/golden_tiny/meta.json`` -> ``config``, so a small model used in tests and
the published ViT-B are described the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class SamMed2DConfig:
    """Hyper-parameters that fix the network's shapes."""

    image_size: int = 256
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_transformer_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    encoder_adapter: bool = True
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (16 for 256 input and 16 px patches)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamMed2DConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        cleaned = dict(values)
        for key in ("encoder_global_attn_indexes", "pixel_mean", "pixel_std"):
            if key in cleaned:
                cleaned[key] = tuple(cleaned[key])
        return cls(**cleaned)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("encoder_global_attn_indexes", "pixel_mean", "pixel_std"):
            out[key] = list(out[key])
        return out


NAMED_CONFIGS: dict[str, SamMed2DConfig] = {
    "vit_b": SamMed2DConfig(),
    "vit_l": SamMed2DConfig(
        encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": SamMed2DConfig(
        encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)
    ),
}


def resolve_config(config: str | Path | Mapping[str, Any] | SamMed2DConfig) -> SamMed2DConfig:
    """Turn a name (``vit_b``), a JSON file path, a dict or a config into a :class:`SamMed2DConfig`.

    A JSON file may hold the config itself or a ``meta.json``-like object with a ``config`` entry.
    """
    if isinstance(config, SamMed2DConfig):
        return config
    if isinstance(config, Mapping):
        return SamMed2DConfig.from_dict(config)
    name = str(config)
    if name in NAMED_CONFIGS:
        return NAMED_CONFIGS[name]
    path = Path(name)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {path}")
        values = json.loads(path.read_text())
        if "config" in values and isinstance(values["config"], Mapping):
            values = values["config"]
        return SamMed2DConfig.from_dict(values)
    raise ValueError(f"unknown model config {name!r}: use one of {sorted(NAMED_CONFIGS)} or a path to a JSON file")
