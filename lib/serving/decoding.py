"""How this server turns prompts into a mask: the one definition shared by serving, validation, evaluation and scoring.

The published SAM-Med2D train and test scripts decode every prompt (box, one click, several clicks, with or without
the previous mask) with ``multimask_output=True`` and keep the candidate with the highest predicted IoU; output 0 (the
single-mask token) is never trained by that recipe, nor by ours. So the server does the same by default, and the
trainer's validation, the promotion gate, the uncertainty scorer and :mod:`lib.training.evaluation` decode through the
functions here with the same :class:`ServedDecoding`, so that a validation Dice is what an annotator gets through REST.

* :func:`decode_rows`: prompt rows in the model's input frame -> kept low-resolution logits (batched);
* :func:`decode_view`: prompts in original image pixels on an encoded view
  (:class:`lib.serving.embedding_cache.CachedEmbedding`) -> kept logits, exactly what a click on the server runs;
* :func:`view_mask`: kept logits -> the boolean mask in original pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch

from lib.modeling import SamMed2D
from lib.modeling.mask_decoder import DecodedTokens
from lib.modeling.transformer import Attention
from lib.serving.embedding_cache import CachedEmbedding
from lib.serving.preprocessing import POLICIES, FrameGeometry, PolicyName


@dataclasses.dataclass(frozen=True)
class ServedDecoding:
    """The decoding rule of a server.

    Attributes:
        policy: preprocessing policy (:mod:`lib.serving.preprocessing`): ``evaluation`` (as the weights were trained) or
            ``predictor`` (the published predictor). Training data is prepared with it too.
        multimask_output: the default for every prompt: decode SAM's three candidates and keep the best predicted
            IoU (what the recipe trains); a request may still ask for ``false`` (output 0).
        adapters: encoder adapters on (SAM-Med2D) or off (SAM-Med2D*).
        threshold: a pixel is in the mask when its logit is above this.
        mask_prompt: how the previous low-resolution logits enter as the next mask prompt: ``probabilities``
            (their sigmoid, as the published training and test scripts do) or ``logits`` (as the published predictor
            does). Follows ``policy`` unless given.
    """

    policy: PolicyName = "evaluation"
    multimask_output: bool = True
    adapters: bool = True
    threshold: float = 0.0
    mask_prompt: Literal["probabilities", "logits", "auto"] = "auto"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"preprocessing must be one of {POLICIES}, got {self.policy!r}")
        if self.mask_prompt == "auto":
            object.__setattr__(self, "mask_prompt", "logits" if self.policy == "predictor" else "probabilities")
        if self.mask_prompt not in ("probabilities", "logits"):
            raise ValueError(f"mask_prompt must be 'probabilities' or 'logits', got {self.mask_prompt!r}")

    def mask_input(self, previous_low_res: torch.Tensor) -> torch.Tensor:
        """The previous kept logits ``(R, 1, s, s)`` as the next mask prompt."""
        previous_low_res = previous_low_res.float()
        return torch.sigmoid(previous_low_res) if self.mask_prompt == "probabilities" else previous_low_res

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for ``/info`` and logs."""
        return (
            f"preprocessing {self.policy}; multimask_output {str(self.multimask_output).lower()} by default for every "
            f"prompt (best of three predicted IoUs: the published train/test scripts never train output 0); "
            f"previous mask as {self.mask_prompt}; adapters {'on' if self.adapters else 'off'}; "
            f"threshold {self.threshold:g}"
        )


def prompt_independent_inputs(
    model: SamMed2D, features: torch.Tensor, image_pe: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """What the decoder needs with an image embedding ``(1, C, h, w)`` whatever the prompt.

    Returns ``image_pe`` ``(1, C, h, w)`` (the dense positional encoding: it depends on the weights only, so pass
    the model's one and every entry shares it), ``src_no_mask`` = features + the dense embedding used when there
    is no mask prompt (what the decoder's transformer reads) and, under ``first_layer.*``, the image tokens in the
    transformer's layout and its first projections of ``src_no_mask`` (:meth:`TwoWayTransformer.first_layer_terms`),
    with what a mask prompt moves them from (:func:`mask_prompt_bases`).
    """
    prompt_encoder = model.prompt_encoder
    if image_pe is None:
        image_pe = prompt_encoder.get_dense_pe()
    no_mask_dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    src_no_mask = features + no_mask_dense
    first_layer = model.mask_decoder.transformer.first_layer_terms(src_no_mask, image_pe)
    first_layer.update(mask_prompt_bases(model, first_layer))
    return {"image_pe": image_pe, "src_no_mask": src_no_mask, **{f"first_layer.{k}": v for k, v in first_layer.items()}}


def moved_terms(model: SamMed2D) -> list[tuple[str, Attention | None, torch.nn.Linear | None]]:
    """The first-layer terms a mask prompt moves, in the column order of :func:`mask_prompt_bases`: the image tokens,
    then the first block's three projections of them (:meth:`TwoWayAttentionBlock.image_terms`), each with its
    attention and projection."""
    block = model.mask_decoder.transformer.layers[0]
    t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
    return [("keys", None, None), ("t2i_k", t2i, t2i.k_proj), ("t2i_v", t2i, t2i.v_proj), ("i2t_q", i2t, i2t.q_proj)]


# PromptEncoder.mask_token_weights, kept with the first-layer terms.
MASK_TOKEN_WEIGHTS = ("mask_pixels_weight", "mask_pixels_bias", "mask_sub_blocks_weight", "mask_sub_blocks_bias")


def mask_prompt_bases(model: SamMed2D, first_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """From the first-layer terms of an image without a mask prompt (batch 1), what :func:`mask_prompt_terms` moves
    by a mask's channels, side by side: ``mask_base`` ``(1, h*w, C + 3 D)`` and ``mask_weight`` ``(16, C + 3 D)``;
    and the prompt encoder's products that make those channels (:data:`MASK_TOKEN_WEIGHTS`).

    The dense embedding of a mask is a 1x1 convolution ``W`` ``(C, 16)``, ``b`` of its 16 channels ``c`` per token;
    without a mask it is ``no_mask``. So a mask moves each image token by ``c W^T + b - no_mask``, and each of the
    first block's three projections ``P`` of the tokens by ``c (P W)^T + P (b - no_mask)``: the terms without the
    mask plus the constant parts are ``mask_base``, and ``mask_weight`` is ``[W^T, (P W)^T ...]``, so that a mask
    prompt's terms are one ``(h*w, 16)`` product away.
    """
    prompt_encoder = model.prompt_encoder
    last = prompt_encoder.mask_downscaling[-1]
    weight = last.weight.flatten(1)  # (C, 16)
    shift = last.bias - prompt_encoder.no_mask_embed.weight[0]  # (C,)
    bases, weights = [], []
    for name, _, projection in moved_terms(model):
        term = first_layer[name]
        if projection is None:
            bases.append(term + shift)
            weights.append(weight.t())
            continue
        flat = term.transpose(1, 2).reshape(term.shape[0], term.shape[2], -1)  # (1, heads, N, d) -> (1, N, D)
        bases.append(flat + projection.weight @ shift)
        weights.append((projection.weight @ weight).t())
    token_weights = dict(zip(MASK_TOKEN_WEIGHTS, prompt_encoder.mask_token_weights(), strict=True))
    return {"mask_base": torch.cat(bases, dim=-1), "mask_weight": torch.cat(weights, dim=-1), **token_weights}


def decode_rows(
    model: SamMed2D,
    entry: CachedEmbedding,
    decoding: ServedDecoding,
    point_coords: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    previous_low_res: torch.Tensor | None = None,
    multimask_output: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``R`` prompt rows on one encoded image, prompts in the model's input frame.

    Args:
        model: the network.
        entry: the image's embedding ``features`` ``(1, C, h, w)``; its ``extras`` hold
            :func:`prompt_independent_inputs` (computed here when absent), and ``onnx_decoder`` where the server
            decodes with ONNX Runtime, or ``decoder_graphs`` (:class:`lib.serving.decoder_graphs.DecoderGraphs` of
            ``model``) where it replays recorded graphs of these operations.
        decoding: the rule (mask prompt form, default multimask).
        point_coords: ``(R, N, 2)`` (x, y); ``point_labels``: ``(R, N)`` 1 foreground, 0 background.
        boxes: ``(R, 4)`` XYXY.
        previous_low_res: ``(R, 1, s, s)`` kept logits of the previous decoding (the mask prompt), or ``None``.
        multimask_output: ``None`` for the rule's default.

    Returns:
        kept low-resolution logits ``(R, 1, s, s)`` and their predicted IoU ``(R,)``.
    """
    if not entry.extras:
        entry.extras.update(prompt_independent_inputs(model, entry.features))
    multimask = decoding.multimask_output if multimask_output is None else multimask_output
    onnx_decoder = entry.extras.get("onnx_decoder")
    if onnx_decoder is not None:
        # --conf backend onnxruntime: the same outputs from ONNX Runtime (lib.serving.onnx_backend.OnnxDecoder).
        mask = None if previous_low_res is None else decoding.mask_input(previous_low_res)
        masks, iou = onnx_decoder(entry.features, point_coords, point_labels, boxes, mask)
        best = kept_output(iou, multimask)
        rows = torch.arange(iou.shape[0], device=iou.device)
        return masks[rows, best][:, None].clone(), iou.gather(1, best[:, None])[:, 0]
    first_layer = {k.split(".", 1)[1]: v for k, v in entry.extras.items() if k.startswith("first_layer.")}
    src, image_pe = entry.extras["src_no_mask"], entry.extras["image_pe"]
    mask = None if previous_low_res is None else decoding.mask_input(previous_low_res)
    # --conf decoder_graphs true: a click replays the same operations from recorded graphs (lib.serving.decoder_graphs).
    graphs = entry.extras.get("decoder_graphs")
    decoded = None
    if graphs is not None:
        decoded = graphs.decode_tokens(src, image_pe, first_layer, point_coords, point_labels, boxes, mask)
    if decoded is None:
        decoded = decode_prompt_tokens(model, src, image_pe, first_layer, point_coords, point_labels, boxes, mask)
    best = kept_output(decoded.iou, multimask)
    # The predicted IoUs choose the output before any mask is made, so only the kept one is.
    masks = None if graphs is None else graphs.masks(decoded, best)
    if masks is None:
        masks = model.mask_decoder.masks(decoded, best)
    return masks, decoded.iou.gather(1, best[:, None])[:, 0]


def decode_prompt_tokens(
    model: SamMed2D,
    src: torch.Tensor,
    image_pe: torch.Tensor,
    first_layer: dict[str, torch.Tensor],
    point_coords: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
) -> DecodedTokens:
    """Everything of a decoding before its masks, for ``R`` prompt rows on one encoded image: the mask prompt's
    first-layer terms (:func:`mask_prompt_terms`), the sparse prompt embedding, the decoder's transformer and IoU head
    (:meth:`MaskDecoder.decode_tokens`).

    Args:
        src: ``(1, C, h, w)`` the image embedding + the no-mask dense embedding (``src_no_mask``).
        image_pe: ``(1, C, h, w)``.
        first_layer: the first-layer terms of ``src`` (:meth:`TwoWayTransformer.first_layer_terms`).
        point_coords, point_labels, boxes: as :func:`decode_rows` takes them.
        mask_input: ``(R, 1, s, s)`` the mask prompt (:meth:`ServedDecoding.mask_input`), or ``None``.
    """
    if mask_input is not None:
        # The transformer reads the image tokens from these terms; src still gives the grid and the batch.
        first_layer = mask_prompt_terms(model, first_layer, mask_input)
    points = (point_coords, point_labels) if point_coords is not None else None
    sparse, _ = model.prompt_encoder(points, boxes, None)
    return model.mask_decoder.decode_tokens(src, image_pe, sparse, first_layer)


def mask_prompt_terms(
    model: SamMed2D, first_layer: dict[str, torch.Tensor], mask_input: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The first-layer terms (:meth:`TwoWayTransformer.first_layer_terms`) of an image with a mask prompt, from its
    terms without one (:func:`mask_prompt_bases`), without projecting its image tokens again: one product of the
    mask's 16 channels per token (:meth:`PromptEncoder.mask_token_channels`) instead of three ``(h*w, C)`` ones.

    Args:
        first_layer: the terms of the image embedding + the no-mask embedding, batch 1, with their mask bases.
        mask_input: ``(R, 1, s, s)`` the mask prompt as the prompt encoder takes it.

    Returns:
        the terms of each row's image embedding + its mask's dense embedding, batch ``R``.
    """
    token_weights = tuple(first_layer[name] for name in MASK_TOKEN_WEIGHTS)
    channels = model.prompt_encoder.mask_token_channels(mask_input, token_weights)  # (R, h*w, 16)
    rows, weight = channels.shape[0], first_layer["mask_weight"]
    moved = torch.baddbmm(first_layer["mask_base"], channels, weight.expand(rows, -1, -1))  # (R, h*w, C + 3 D)
    terms, start = {"key_pe": first_layer["key_pe"]}, 0
    for name, attention, _ in moved_terms(model):
        term = first_layer[name]  # (1, N, C), or split into heads (1, heads, N, d)
        width = term.shape[-1] if attention is None else term.shape[1] * term.shape[3]
        part = moved[..., start : start + width]
        terms[name] = part if attention is None else attention.separate_heads(part)
        start += width
    return terms


def kept_output(iou: torch.Tensor, multimask: bool) -> torch.Tensor:
    """The output each row keeps, from the predicted IoU ``(R, T)`` of all outputs: with ``multimask`` the best of
    outputs 1..3 (the published decoder's multimask slice), otherwise output 0; ``(R,)``."""
    if multimask:
        return iou[:, 1:].argmax(dim=1) + 1
    return torch.zeros(iou.shape[0], dtype=torch.long, device=iou.device)


def decode_view(
    model: SamMed2D,
    entry: CachedEmbedding,
    decoding: ServedDecoding,
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    previous_low_res: torch.Tensor | None = None,
    multimask_output: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt on an encoded view, in the view's original pixels: what a click on the server decodes.

    Args:
        point_coords: ``(N, 2)`` (x, y) pixels of the view (``N`` may be 0); ``point_labels``: ``(N,)``.
        box: ``(4,)`` XYXY pixels or ``None``.
        previous_low_res: ``(1, 1, s, s)`` kept logits of this view's previous decoding, or ``None``.

    Returns:
        ``(1, 1, s, s)`` kept logits and their predicted IoU ``(1,)``.
    """
    geometry: FrameGeometry = entry.geometry
    device = entry.features.device
    coords = labels = boxes = None
    if point_coords is not None and len(point_coords):
        coords = torch.as_tensor(geometry.points_to_input(point_coords), dtype=torch.float32)[None].to(device)
        labels = torch.as_tensor(point_labels, dtype=torch.int64)[None].to(device)
    if box is not None:
        boxes = torch.as_tensor(geometry.boxes_to_input(box), dtype=torch.float32)[None].to(device)
    return decode_rows(model, entry, decoding, coords, labels, boxes, previous_low_res, multimask_output)


def view_mask(geometry: FrameGeometry, low_res: torch.Tensor, decoding: ServedDecoding) -> torch.Tensor:
    """Kept logits ``(R, 1, s, s)`` -> ``(R, H, W)`` boolean masks in the view's original pixels."""
    return geometry.masks_to_original(low_res.float())[:, 0] > decoding.threshold
