"""Running the exported ONNX files (:mod:`lib.export`) with ONNX Runtime on CPU.

:class:`OnnxSamMed2D` gives the two calls the server makes, encode and decode-all-outputs, with the same tensors in
and out as the torch modules; which output is kept stays :mod:`lib.decoding`'s rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .export import DECODER_FILE, ENCODER_FILE


class OnnxSamMed2D:
    """ONNX Runtime sessions of ``image_encoder.onnx`` and ``decoder.onnx`` in ``onnx_dir``, ``threads`` intra-op."""

    def __init__(self, onnx_dir: str | Path, threads: int = 2) -> None:
        import onnxruntime as ort  # optional dependency: only this backend needs it

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: spinning threads would take the cores from torch and from
        # the server's request handling between two calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(Path(onnx_dir) / ENCODER_FILE), options, providers=providers)
        self.decoder = ort.InferenceSession(str(Path(onnx_dir) / DECODER_FILE), options, providers=providers)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(1, 3, S, S)`` normalised image -> ``(1, C, h, w)`` image embedding."""
        (features,) = self.encoder.run(None, {"image": images.detach().cpu().numpy().astype(np.float32)})
        return torch.from_numpy(features)

    def decode_all(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every output token's low-res logits ``(B, T, 4h, 4w)`` and IoU ``(B, T)``.

        Args:
            image_embeddings: ``(1, C, h, w)``.
            point_coords: ``(B, N, 2)`` in the input frame, box corners included; ``point_labels``: ``(B, N)`` with
                the ONNX convention of :mod:`lib.export` (2/3 box corners, -1 padding).
            mask_input: ``(B, 1, 4h, 4w)`` mask prompt as the model takes it, or ``None``.
        """
        rows = point_coords.shape[0]
        _, _, height, width = image_embeddings.shape
        has_mask = mask_input is not None
        if mask_input is None:
            mask_input = torch.zeros(rows, 1, 4 * height, 4 * width)
        feeds = {
            "image_embeddings": image_embeddings.detach().cpu().numpy(),
            "point_coords": point_coords.detach().cpu().numpy().astype(np.float32),
            "point_labels": point_labels.detach().cpu().numpy().astype(np.float32),
            "mask_input": mask_input.detach().cpu().numpy().astype(np.float32),
            "has_mask_input": np.array([float(has_mask)], dtype=np.float32),
        }
        masks, iou = self.decoder.run(None, feeds)
        return torch.from_numpy(masks), torch.from_numpy(iou)


def onnx_prompts(
    point_coords: torch.Tensor | None, point_labels: torch.Tensor | None, boxes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``(B, N, 2)``/``(B, N)`` and boxes ``(B, 4)`` -> the decoder's points and labels.

    As :class:`lib.modeling.PromptEncoder` does: box corners follow the points; without a box one padding point
    ``(0, 0)`` labelled -1 ends the row.
    """
    rows = (point_coords if point_coords is not None else boxes).shape[0]
    coords = [point_coords] if point_coords is not None else []
    labels = [point_labels.float()] if point_labels is not None else []
    if boxes is not None:
        coords.append(boxes.reshape(rows, 2, 2))
        labels.append(torch.tensor([[2.0, 3.0]]).expand(rows, -1))
    else:
        coords.append(torch.zeros(rows, 1, 2))
        labels.append(-torch.ones(rows, 1))
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1)
