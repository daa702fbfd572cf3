"""SAM's mask decoder as SAM-Med2D uses it: one image embedding per prompt row."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, store_weight_in_memory_order, store_weights_input_major
from .onednn_linear import OneDnnLinear, linear
from .transformer import TwoWayTransformer


@dataclasses.dataclass
class DecodedTokens:
    """The decoder's state after its transformer, before the masks (:meth:`MaskDecoder.decode_tokens`).

    Attributes:
        mask_tokens: ``(B, T, C)`` the mask tokens' outputs.
        image_tokens: ``(B, h*w, C)`` the image tokens' outputs.
        grid: ``(h, w)`` of the image tokens.
        iou: ``(B, T)`` predicted IoU of each output.
    """

    mask_tokens: torch.Tensor
    image_tokens: torch.Tensor
    grid: tuple[int, int]
    iou: torch.Tensor


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(OneDnnLinear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Predicts masks and their IoU from image and prompt embeddings.

    Unlike SAM's decoder it does not repeat the image embedding inside: ``image_embeddings`` must have one row per
    prompt row (``B``), as in the published SAM-Med2D.
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        store_weights_input_major(self)
        for layer in (self.output_upscaling[0], self.output_upscaling[3]):
            store_subpixel_major(layer)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompt rows.

        Args:
            image_embeddings: ``(B, C, h, w)``.
            image_pe: ``(1, C, h, w)``.
            sparse_prompt_embeddings: ``(B, N, C)``.
            dense_prompt_embeddings: ``(B, C, h, w)``.
            multimask_output: return the three multimask outputs instead of the single-mask output.

        Returns:
            low-resolution mask logits ``(B, M, 4h, 4w)`` and predicted IoU ``(B, M)``, M = 3 or 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` outputs: masks ``(B, T, 4h, 4w)``, IoU ``(B, T)``."""
        return self.predict_masks_from_src(
            image_embeddings + dense_prompt_embeddings, image_pe, sparse_prompt_embeddings
        )

    def predict_masks_from_src(
        self,
        src: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        first_layer_terms: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode from ``src`` = image embedding + dense prompt embedding, ``(B, C, h, w)``.

        A server that caches ``src`` for the no-mask case (it does not depend on the prompt) skips that sum per click,
        and with ``first_layer_terms`` (:meth:`TwoWayTransformer.first_layer_terms` of that ``src``) three of the
        transformer's ten projections of the image tokens.
        Returns all ``num_mask_tokens`` outputs: masks ``(B, T, 4h, 4w)``, IoU ``(B, T)``.
        """
        decoded = self.decode_tokens(src, image_pe, sparse_prompt_embeddings, first_layer_terms)
        return self.masks(decoded), decoded.iou

    def decode_tokens(
        self,
        src: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        first_layer_terms: dict[str, torch.Tensor] | None = None,
    ) -> DecodedTokens:
        """The two-way transformer and the IoU head on ``src`` ``(B or 1, C, h, w)``: everything before the masks.

        The predicted IoU of every output comes from here, so a caller that keeps one output per row (the best
        predicted IoU) can ask :meth:`masks` for that output only.
        """
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        if src.shape[0] != batch:
            src = src.expand(batch, -1, -1, -1)
        # The positional encoding is the same for every row: the transformer's sums broadcast it.
        hs, image_tokens = self.transformer(src, image_pe, tokens, first_layer_terms, outputs=1 + self.num_mask_tokens)
        return DecodedTokens(
            mask_tokens=hs[:, 1 : 1 + self.num_mask_tokens, :],
            image_tokens=image_tokens,
            grid=(src.shape[2], src.shape[3]),
            iou=self.iou_prediction_head(hs[:, 0, :]),
        )

    def masks(self, decoded: DecodedTokens, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """Low-resolution logits of every output ``(B, T, 4h, 4w)``, or with ``outputs`` ``(B,)`` (an output index
        per row) of that output only, ``(B, 1, 4h, 4w)``: a kept mask costs one hypernetwork MLP, not four."""
        b = decoded.image_tokens.shape[0]
        h, w = decoded.grid
        upscaled = self.upscale_tokens(decoded.image_tokens)  # (B, 16 h w, C / 8), pixels in sub-pixel order
        mlps = self.output_hypernetworks_mlps
        if outputs is None:
            hyper_in = torch.stack([mlp(decoded.mask_tokens[:, i, :]) for i, mlp in enumerate(mlps)], dim=1)
        elif b == 1:  # a click: no grouping of rows by output
            kept = int(outputs[0])
            hyper_in = mlps[kept](decoded.mask_tokens[:, kept : kept + 1, :])
        else:
            hyper_in = decoded.mask_tokens.new_empty(b, 1, upscaled.shape[2])
            for i in outputs.unique().tolist():  # rows that keep output i share its MLP
                rows = (outputs == i).nonzero()[:, 0]
                hyper_in[rows, 0] = mlps[i](decoded.mask_tokens[rows, i, :])
        masks = hyper_in @ upscaled.transpose(1, 2)  # (B, T or 1, 16 h w)
        # Sub-pixel order (y, x, a1, b1, a2, b2) -> row 4y + 2 a1 + a2, column 4x + 2 b1 + b2.
        return masks.view(b, -1, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, -1, 4 * h, 4 * w)

    def upscale_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` on the image tokens ``(B, h*w, C)`` -> ``(B, 16 h w, C / 8)`` channels-last.

        Each 2x2 stride-2 transposed convolution maps a pixel to its own 2x2 block (no overlap), so it is one matrix
        product to the four sub-pixels' channels, and the layer norm and activations act per pixel: the pixels stay
        in sub-pixel order (``(y, x, a1, b1, a2, b2)`` for output pixel ``(4y + 2 a1 + a2, 4x + 2 b1 + b2)``) and
        only the few mask channels are put in image order, by :meth:`masks`. Same sums as the convolutions, without
        the layout copies of ``(B, C, H, W)`` and oneDNN's slow small transposed convolutions.
        """
        up1, norm, act1, up2, act2 = self.output_upscaling
        x = tokens
        for layer in (up1, up2):
            # weight (Cin, Cout, 2, 2) -> (Cin, 2 * 2 * Cout): output columns ordered (a, b, channel); a view where the
            # weight is stored so (store_subpixel_major). The bias, the same for the four sub-pixels, is added to the
            # product in place, broadcast over them (a 4x-repeated bias for the product to add was one more operation,
            # and a slower one).
            weight = layer.weight.permute(0, 2, 3, 1).reshape(layer.in_channels, -1)
            x = linear(x.reshape(-1, layer.in_channels), weight.t())
            x = x.view(tokens.shape[0], -1, layer.out_channels).add_(layer.bias)
            if layer is up1:
                x = act1(F.layer_norm(x, (layer.out_channels,), norm.weight, norm.bias, norm.eps))
        return act2(x)


def store_subpixel_major(layer: nn.ConvTranspose2d) -> None:
    """Store a 2x2 stride-2 transposed convolution's weight ``(Cin, Cout, 2, 2)`` as :meth:`MaskDecoder.upscale_tokens`
    reads it, ``(Cin, 2, 2, Cout)`` contiguous: same shape, values and state dict, and a click reads the weight as a
    ``(Cin, 4 Cout)`` matrix in place instead of copying it (256 KB) into that order."""
    store_weight_in_memory_order(layer, (0, 2, 3, 1))
