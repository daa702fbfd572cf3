"""Running the exported ONNX files (:mod:`lib.serving.export`) with ONNX Runtime on CPU.

:class:`OnnxDecoder` computes what the torch prompt encoder + mask decoder compute (every output token's logits and
IoU); which output is kept and how the previous mask enters stay :mod:`lib.serving.decoding`'s rule. The server uses it
with ``--conf backend onnxruntime``: the decoder is exported from the served weights in memory (a few MB), so a newly
published model gets its own. :class:`OnnxSamMed2D` runs both files of ``python -m lib.serving.export onnx``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from lib.modeling import SamMed2D
from lib.serving.export import DECODER_FILE, ENCODER_FILE, export_decoder


def _session(model: str | Path | bytes, threads: int):
    import onnxruntime as ort  # optional dependency: only this backend needs it

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning: spinning threads would take the cores from torch and from the
    # server's request handling between two calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


class OnnxDecoder:
    """ONNX Runtime session of ``decoder.onnx`` (a path, or the bytes of an in-memory export)."""

    def __init__(self, model: str | Path | bytes, threads: int = 1) -> None:
        self.session = _session(model, threads)
        embedding = self.session.get_inputs()[0].shape  # (1, C, h, w)
        self.mask_hw = (4 * embedding[2], 4 * embedding[3])

    @classmethod
    def from_model(cls, model: SamMed2D, threads: int = 1) -> OnnxDecoder:
        """Export ``model``'s prompt encoder + mask decoder in memory and open it."""
        buffer = io.BytesIO()
        export_decoder(model, buffer)
        return cls(buffer.getvalue(), threads)

    def __call__(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every output token's low-res logits ``(R, T, 4h, 4w)`` and IoU ``(R, T)``, on ``image_embeddings``'s
        device.

        Args:
            image_embeddings: ``(1, C, h, w)``.
            point_coords: ``(R, N, 2)`` (x, y) in the input frame; ``point_labels``: ``(R, N)`` 1/0.
            boxes: ``(R, 4)`` XYXY in the input frame.
            mask_input: ``(R, 1, 4h, 4w)`` mask prompt as the model takes it, or ``None``.
        """
        coords, labels = onnx_prompts(point_coords, point_labels, boxes)
        has_mask = mask_input is not None
        if mask_input is None:
            mask_input = torch.zeros(coords.shape[0], 1, *self.mask_hw)
        feeds = {
            "image_embeddings": _numpy(image_embeddings),
            "point_coords": _numpy(coords),
            "point_labels": _numpy(labels),
            "mask_input": _numpy(mask_input),
            "has_mask_input": np.array([float(has_mask)], dtype=np.float32),
        }
        masks, iou = self.session.run(None, feeds)
        device = image_embeddings.device
        return torch.from_numpy(masks).to(device), torch.from_numpy(iou).to(device)


class OnnxSamMed2D:
    """Both files of ``python -m lib.serving.export onnx`` in ``onnx_dir``, ``threads`` intra-op threads each."""

    def __init__(self, onnx_dir: str | Path, threads: int = 2) -> None:
        self.encoder = _session(Path(onnx_dir) / ENCODER_FILE, threads)
        self.decoder = OnnxDecoder(Path(onnx_dir) / DECODER_FILE, threads)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(1, 3, S, S)`` normalised image -> ``(1, C, h, w)`` image embedding."""
        (features,) = self.encoder.run(None, {"image": _numpy(images)})
        return torch.from_numpy(features)


def onnx_prompts(
    point_coords: torch.Tensor | None, point_labels: torch.Tensor | None, boxes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``(R, N, 2)``/``(R, N)`` and boxes ``(R, 4)`` -> the decoder's points ``(R, N', 2)`` and float labels.

    As :class:`lib.modeling.PromptEncoder` does: box corners (labels 2, 3) follow the points; without a box one
    padding point ``(0, 0)`` labelled -1 ends the row.
    """
    rows = (point_coords if point_coords is not None else boxes).shape[0]
    coords = [point_coords.cpu().float()] if point_coords is not None else []
    labels = [point_labels.cpu().float()] if point_labels is not None else []
    if boxes is not None:
        coords.append(boxes.cpu().float().reshape(rows, 2, 2))
        labels.append(torch.tensor([[2.0, 3.0]]).expand(rows, -1))
    else:
        coords.append(torch.zeros(rows, 1, 2))
        labels.append(-torch.ones(rows, 1))
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1)
