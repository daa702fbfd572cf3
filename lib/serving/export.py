"""Export SAM-Med2D to ONNX: the image encoder, and the prompt encoder + mask decoder, as two files.

``python -m lib.serving.export onnx --checkpoint sam-med2d_b.pth --out onnx/ [--no-adapters] [--config vit_b]`` writes

* ``image_encoder.onnx``: ``image`` ``(1, 3, S, S)`` normalised (:mod:`lib.serving.preprocessing`) ->
  ``image_embeddings`` ``(1, C, h, w)``;
* ``decoder.onnx``: ``image_embeddings`` ``(1, C, h, w)``, ``point_coords`` ``(B, N, 2)`` (x, y) in the model's input
  frame, ``point_labels`` ``(B, N)`` float (1 foreground, 0 background, 2 and 3 the top-left and bottom-right box
  corners, -1 padding), ``mask_input`` ``(B, 1, 4h, 4w)`` and ``has_mask_input`` ``(1,)`` (1 or 0) ->
  ``masks`` ``(B, T, 4h, 4w)`` low-resolution logits and ``iou_predictions`` ``(B, T)`` of every output token.

Prompts follow the published SAM ONNX convention (a box is two points labelled 2 and 3; a prompt without a box ends
with one padding point ``(0, 0)`` labelled -1). The decoder returns all ``T`` outputs: which one is kept
(multimask or not) and how the previous mask enters are the server's decoding rule, :mod:`lib.serving.decoding`, not the
file's.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from lib.io.checkpoint import CheckpointError, load_model
from lib.modeling import SamMed2D

OPSET = 17
ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "decoder.onnx"


class PromptDecoder(nn.Module):
    """Prompt encoder + mask decoder with ONNX-friendly inputs (see the module docstring for the interface).

    Computes what :class:`lib.modeling.PromptEncoder` and :meth:`MaskDecoder.predict_masks` compute, with the label
    tests as 0/1 factors instead of branches so that one graph serves points, boxes and both.
    """

    def __init__(self, model: SamMed2D) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.prompt_encoder
        height, width = encoder.input_image_size
        coords = point_coords + 0.5  # centre of the pixel
        coords = torch.stack([coords[..., 0] / width, coords[..., 1] / height], dim=-1)
        embedding = encoder.pe_layer._pe_encoding(coords)
        labels = point_labels.unsqueeze(-1)
        embedding = embedding * (labels != -1) + encoder.not_a_point_embed.weight * (labels == -1)
        for i, point_embedding in enumerate(encoder.point_embeddings):
            embedding = embedding + point_embedding.weight * (labels == i)
        dense = has_mask_input * encoder.mask_downscaling(mask_input)
        dense = dense + (1 - has_mask_input) * encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return self.mask_decoder.predict_masks(image_embeddings, encoder.get_dense_pe(), embedding, dense)


def example_decoder_inputs(model: SamMed2D, rows: int = 1, points: int = 2) -> dict[str, torch.Tensor]:
    """Inputs of ``decoder.onnx`` with the right shapes and dtypes (for tracing and smoke tests)."""
    grid = model.prompt_encoder.image_embedding_size
    return {
        "image_embeddings": torch.zeros(1, model.config.prompt_embed_dim, *grid),
        "point_coords": torch.full((rows, points, 2), 10.0),
        "point_labels": torch.ones(rows, points),
        "mask_input": torch.zeros(rows, 1, 4 * grid[0], 4 * grid[1]),
        "has_mask_input": torch.zeros(1),
    }


def export_decoder(model: SamMed2D, target: str | Path | BinaryIO) -> None:
    """Write ``decoder.onnx`` of ``model`` (CPU, fp32) to a path or a binary file object (an in-memory export)."""
    # Two rows, so that the trace keeps the image embedding's expansion to the number of prompt rows.
    inputs = example_decoder_inputs(model, rows=2)
    axes = {name: {0: "rows"} for name in ("point_coords", "point_labels", "mask_input", "masks", "iou_predictions")}
    axes["point_coords"][1] = axes["point_labels"][1] = "points"
    _export(PromptDecoder(model), tuple(inputs.values()), target, list(inputs), ["masks", "iou_predictions"], axes)


def export_onnx(model: SamMed2D, out_dir: str | Path) -> dict[str, Path]:
    """Write ``image_encoder.onnx`` and ``decoder.onnx`` of ``model`` (on CPU, fp32) into ``out_dir``.

    The encoder is exported with the adapters as ``model`` runs them (see ``set_adapters_enabled``).
    Returns the two paths by role (``encoder``, ``decoder``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    size = model.config.image_size
    paths = {"encoder": out / ENCODER_FILE, "decoder": out / DECODER_FILE}
    image = torch.zeros(1, 3, size, size)
    _export(model.image_encoder, (image,), paths["encoder"], ["image"], ["image_embeddings"], None)
    export_decoder(model, paths["decoder"])
    return paths


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    target: str | Path | BinaryIO,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # Python-level shape checks become constants of the trace: the shapes are fixed except the prompt axes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: no onnxscript needed
        torch.onnx.export(
            module,
            args,
            target if not isinstance(target, Path) else str(target),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.serving.export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    onnx = sub.add_parser("onnx", help="image encoder and prompt encoder + mask decoder as ONNX files")
    onnx.add_argument("--checkpoint", required=True, help="any checkpoint lib.io.checkpoint loads")
    onnx.add_argument("--out", required=True, help="folder for image_encoder.onnx and decoder.onnx")
    onnx.add_argument("--config", default="vit_b", help="vit_b, vit_l, vit_h or a config JSON (default vit_b)")
    onnx.add_argument("--no-adapters", action="store_true", help="export the encoder without adapters (SAM-Med2D*)")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.checkpoint, args.config, adapters=not args.no_adapters)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    for role, path in export_onnx(model, args.out).items():
        print(f"{role}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
