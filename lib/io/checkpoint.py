"""Checkpoint loading and conversion, without ever executing pickled code.

Supported layouts (detected, never declared):

1. ``{"model": state_dict}``: the published SAM-Med2D checkpoint.
2. ``{"model": state_dict, "optimizer": <pickled optimizer>}``: what the published training script writes (and the
   likely layout of the released ``sam-med2d_b.pth``). Loaded with ``torch.load(weights_only=True)``; the optimizer
   object is replaced by an inert placeholder during unpickling, so none of its code runs.
3. A bare state dict in this project's layout (``.pth``/``.pt`` or ``.safetensors``).
4. Original SAM (``sam_vit_b_01ec64.pth``: 1024 input, no adapters): converted to the 256 model the way the published
   loader does (``pos_embed`` and global rel-pos tables resized; adapters freshly initialised).

Command line::

    python -m lib.io.checkpoint convert sam-med2d_b.pth apps/sam_med2d/model/sam_med2d_b.pt [--config vit_b]
    python -m lib.io.checkpoint inspect some_checkpoint.pth
"""

from __future__ import annotations

import argparse
import collections
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lib.common.atomic_files import atomic_path
from lib.common.memory import drop_mapped_pages, drop_mapped_range
from lib.modeling import SamMed2D
from lib.modeling.build import build_model
from lib.modeling.config import SamMed2DConfig, resolve_config

LAYOUT_PUBLISHED = "published"
LAYOUT_TRAIN_SCRIPT = "train-script"
LAYOUT_STATE_DICT = "state-dict"
LAYOUT_SAM_ORIGINAL = "sam-original"
_OPTIMIZER_CLASSES = ("adam.Adam", "adamw.AdamW", "sgd.SGD")
# A swap copies a mapped checkpoint into the served model this many bytes at a time, dropping each part's pages:
# ViT-B's largest tensors (the adapters' 4x4 transposed convolutions, 768x768x4x4) are 38 MB each.
COPY_CHUNK_BYTES = 4 * 2**20
_MAX_NAMES = 8


class CheckpointError(ValueError):
    """The file is not a usable checkpoint for the requested model; the message names the problem."""


class _DiscardedObject:
    """Stands in for a pickled optimizer: accepts its state and keeps none of it."""

    def __setstate__(self, state: Any) -> None:
        pass


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMES])
    return shown + (f" (+{len(keys) - _MAX_NAMES} more)" if len(keys) > _MAX_NAMES else "")


def _torch_load(path: Path, mmap: bool = False) -> Any:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (not a zip archive; the file may be truncated or of another kind)"
        )
    safe = [(_DiscardedObject, f"torch.optim.{name}") for name in _OPTIMIZER_CLASSES]
    try:
        with torch.serialization.safe_globals([*safe, collections.defaultdict, dict]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"cannot read {path} as a weights-only checkpoint: {exc}") from exc


def read_state_dict(path: str | Path, mmap: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Read the tensors of a checkpoint file and say which layout it had (before any conversion).

    Returns the state dict and one of ``published``, ``train-script``, ``state-dict``, ``sam-original``. With
    ``mmap`` the tensors of a PyTorch file are views of the file mapped into memory: nothing is read until used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc
        layout = LAYOUT_STATE_DICT
    else:
        obj = _torch_load(path, mmap=mmap)
        if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
            state = dict(obj["model"])
            layout = LAYOUT_TRAIN_SCRIPT if "optimizer" in obj else LAYOUT_PUBLISHED
        elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = dict(obj)
            layout = LAYOUT_STATE_DICT
        else:
            kind = type(obj).__name__
            keys = _names(sorted(map(str, obj))) if isinstance(obj, Mapping) else ""
            raise CheckpointError(f"{path} holds a {kind} ({keys}), not a SAM-Med2D state dict or {{'model': ...}}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {_names(bad)}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if layout != LAYOUT_SAM_ORIGINAL and _looks_like_sam_original(state):
        layout = LAYOUT_SAM_ORIGINAL
    return state, layout


def _looks_like_sam_original(state: Mapping[str, torch.Tensor]) -> bool:
    pos = state.get("image_encoder.pos_embed")
    has_adapters = any(".Adapter." in k for k in state)
    return pos is not None and not has_adapters and pos.shape[1] == 64


def convert_sam_original(state: Mapping[str, torch.Tensor], config: SamMed2DConfig) -> dict[str, torch.Tensor]:
    """Original SAM tensors (1024 input) resized into a ``config.image_size`` model, as the published loader does.

    ``pos_embed`` is resized bilinearly over its grid; the global blocks' relative-position tables are resized
    bilinearly to ``2 * grid - 1`` rows. Adapter tensors are absent (they keep their fresh initialisation).
    """
    grid = config.embedding_size
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "image_encoder.pos_embed" and value.shape[1] != grid:
            value = F.interpolate(value.permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear", align_corners=False)
            value = value.permute(0, 2, 3, 1)
        elif "rel_pos" in key and _block_index(key) in config.encoder_global_attn_indexes:
            rows = 2 * grid - 1
            if value.shape[0] != rows:
                value = F.interpolate(value[None, None], size=(rows, value.shape[1]), mode="bilinear").squeeze()
        out[key] = value.contiguous()
    return out


def _block_index(key: str) -> int:
    parts = key.split(".")
    return int(parts[parts.index("blocks") + 1]) if "blocks" in parts else -1


def check_compatible(
    model: SamMed2D, state: Mapping[str, torch.Tensor], source: str, allow_missing_adapters: bool = False
) -> None:
    """Raise :class:`CheckpointError` naming missing and unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (allow_missing_adapters and ".Adapter." in k)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {_names(mismatched)}")
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit the model config (embed {model.config.encoder_embed_dim}, depth "
            f"{model.config.encoder_depth}, adapters {model.config.encoder_adapter}): " + "; ".join(problems)
        )


def load_model(
    path: str | Path,
    config: str | Path | Mapping[str, Any] | SamMed2DConfig = "vit_b",
    device: str | torch.device = "cpu",
    adapters: bool = True,
) -> SamMed2D:
    """Build the model for ``config`` and load any supported checkpoint into it, in eval mode.

    ``adapters=False`` runs the encoder without its adapter branch (SAM-Med2D*); the adapter weights are still
    loaded, so the branch can be switched back on with ``model.set_adapters_enabled(True)``.
    """
    cfg = resolve_config(config)
    model = build_model(cfg)
    # Copied in tensor by tensor, the weights are in memory once, not twice (a whole state dict beside the model).
    if copy_checkpoint_into(model, path):
        if cfg.encoder_adapter:
            model.set_adapters_enabled(adapters)
        return model.to(device).eval()
    state, layout = read_state_dict(path)
    if layout == LAYOUT_SAM_ORIGINAL:
        state = convert_sam_original(state, cfg)
    check_compatible(model, state, str(path), allow_missing_adapters=layout == LAYOUT_SAM_ORIGINAL)
    model.load_state_dict(state, strict=layout != LAYOUT_SAM_ORIGINAL)
    if cfg.encoder_adapter:
        model.set_adapters_enabled(adapters)
    return model.to(device).eval()


def copy_checkpoint_into(model: SamMed2D, path: str | Path) -> bool:
    """Overwrite ``model``'s parameters and buffers with a checkpoint's, in place, one tensor at a time.

    A served model takes new weights this way without a second model or a whole state dict beside it: the file is
    mapped, each tensor is copied into its parameter :data:`COPY_CHUNK_BYTES` at a time and each part's pages are
    dropped from the mapping before the next, so memory grows by about one part (a whole 38 MB adapter weight
    before) instead of two copies of the weights (2.2 GB). Keys and shapes are checked against the model before
    anything is copied. Returns ``False``, leaving ``model`` untouched, for what cannot be copied as it is: an original
    SAM checkpoint (converted) and ``.safetensors`` files.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return False
    state, layout = read_state_dict(path, mmap=True)
    if layout == LAYOUT_SAM_ORIGINAL:
        return False
    check_compatible(model, state, str(path))
    targets = model.state_dict()
    copied: tuple[int, int] | None = None  # the span of the file's addresses copied so far
    with torch.no_grad():
        for key in list(state):
            source = state.pop(key)
            _copy_dropping_pages(targets[key], source)
            if source.is_contiguous():
                start, end = source.data_ptr(), source.data_ptr() + source.numel() * source.element_size()
                copied = (start, end) if copied is None else (min(copied[0], start), max(copied[1], end))
                # The pages mapped in around small tensors (up to 64 KB each) otherwise stay: +15 MB by the end.
                drop_mapped_range(*copied)
    return True


def _copy_dropping_pages(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` from a file-mapped ``source``, in parts of rows of about :data:`COPY_CHUNK_BYTES`
    whose pages are dropped once copied (a part of a contiguous tensor's rows is one range of the file)."""
    row_bytes = source[0].numel() * source.element_size() if source.dim() else 0
    if not source.is_contiguous() or row_bytes == 0:
        target.copy_(source)
        drop_mapped_pages(source)
        return
    rows = max(1, COPY_CHUNK_BYTES // row_bytes)
    for start in range(0, source.shape[0], rows):
        part = source[start : start + rows]
        target[start : start + rows].copy_(part)
        drop_mapped_pages(part)


def save_state_dict(model_or_state: SamMed2D | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a plain state dict atomically and durably (``.safetensors`` by suffix, else ``torch.save``)."""
    path = Path(path)
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else dict(model_or_state)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp)
        else:
            torch.save(state, tmp)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.io.checkpoint", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="any supported checkpoint -> plain state dict (.pt or .safetensors)")
    convert.add_argument("source")
    convert.add_argument("target")
    convert.add_argument("--config", default="vit_b", help="vit_b, vit_l, vit_h or a config JSON (default vit_b)")
    inspect = sub.add_parser("inspect", help="print the layout and size of a checkpoint")
    inspect.add_argument("source")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            state, layout = read_state_dict(args.source)
            numel = sum(v.numel() for v in state.values())
            print(f"{args.source}: layout {layout}, {len(state)} tensors, {numel:,} numbers")
            return 0
        _, layout = read_state_dict(args.source)
        model = load_model(args.source, args.config)
        save_state_dict(model, args.target)
        print(f"{args.source} ({layout}) -> {args.target}: {len(model.state_dict())} tensors")
        return 0
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
