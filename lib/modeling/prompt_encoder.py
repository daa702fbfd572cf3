"""SAM's prompt encoder: points, boxes and a low-resolution mask to sparse and dense embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al.), as in SAM."""

    def __init__(self, num_pos_feats: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` coordinates normalised to [0, 1] -> ``(..., 2 * num_pos_feats)``."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an ``(H, W)`` grid: ``(C, H, W)``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((h, w), device=device, dtype=self.positional_encoding_gaussian_matrix.dtype)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        return self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``(B, N, 2)`` pixel (x, y) in an ``(H, W)`` frame -> ``(B, N, C)``."""
        frame = coords_input.new_tensor([image_size[1], image_size[0]])  # (W, H), divides x and y as SAM does
        return self._pe_encoding((coords_input / frame).to(self.positional_encoding_gaussian_matrix.dtype))


class PromptEncoder(nn.Module):
    """Encodes prompts given in the model's input frame (``input_image_size``, pixels, (x, y) order).

    Outputs sparse embeddings ``(B, N, C)`` for points and box corners and dense embeddings ``(B, C, h, w)`` for
    the mask prompt (``(B, 1, 4h, 4w)`` logits or probabilities), where ``(h, w)`` is the image-embedding grid.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # Order: negative point, positive point, box top-left, box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: ``(1, C, h, w)``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def mask_token_weights(self) -> tuple[torch.Tensor, ...]:
        """The mask downscaling's two 2x2 stride-2 convolutions as the products of :meth:`mask_token_channels`:
        ``(16, 4 c1)`` and its bias ``(4 c1,)`` from a token's 4x4 pixels to its four sub-blocks' ``c1`` channels,
        ``(4 c1, c2)`` and ``(c2,)`` from those to the token's ``c2`` channels (``c1, c2`` = ``mask_in_chans // 4,
        mask_in_chans``)."""
        conv1, _, _, conv2, _, _, _ = self.mask_downscaling
        # Pixel (2e + d, 2f + g) of a token's 4x4 block feeds channel ch of its sub-block (e, f) by conv1[ch, 0, d, g].
        sub_blocks = torch.eye(4, dtype=conv1.weight.dtype, device=conv1.weight.device).view(2, 2, 2, 2)
        first = torch.einsum("efEF,cdg->EdFgefc", sub_blocks, conv1.weight[:, 0]).reshape(16, -1)
        second = conv2.weight.permute(2, 3, 1, 0).reshape(-1, conv2.out_channels)  # rows (e, f, ch)
        return first, conv1.bias.repeat(4), second, conv2.bias

    def mask_token_channels(self, masks: torch.Tensor, weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The mask downscaling's layers before its last convolution, per image token: ``(B, 1, 4h, 4w)`` ->
        ``(B, h*w, mask_in_chans)``, tokens in row-major grid order (inference).

        Its two 2x2 stride-2 convolutions never overlap, so image token ``(y, x)`` reads its 4x4 pixels only: both
        convolutions are products of each token's pixels (``weights``: :meth:`mask_token_weights`, which a caller
        may keep), and the layer norms and activations act per sub-block and per token. Same sums as the
        convolutions (within rounding), in 7 kernels (and 4 views) where the convolutions and the channel-first layer
        norms take 26, laid out as the decoder's tokens.
        """
        _, norm1, act1, _, norm2, act2, _ = self.mask_downscaling
        first, first_bias, second, second_bias = weights if weights is not None else self.mask_token_weights()
        b, _, height, width = masks.shape
        tokens = (height // 4) * (width // 4)
        pixels = F.pixel_unshuffle(masks, 4).view(b, 16, tokens).transpose(1, 2)  # each token's 4x4, row-major
        x = torch.baddbmm(first_bias, pixels, first.expand(b, -1, -1)).view(b, tokens, 4, -1)  # per sub-block
        x = act1(F.layer_norm(x, (x.shape[-1],), norm1.weight, norm1.bias, norm1.eps)).view(b, tokens, -1)
        x = torch.baddbmm(second_bias, x, second.expand(b, -1, -1))
        return act2(F.layer_norm(x, (x.shape[-1],), norm2.weight, norm2.bias, norm2.eps))

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """Points ``(B, N, 2)`` with labels ``(B, N)`` -> ``(B, N + pad, C)``.

        As SAM: a point's positional encoding plus its label's embedding (0 negative, 1 positive); a label -1 point
        (padding) is ``not_a_point_embed`` alone, and so is the padding point added when there is no box.
        """
        embedding = self.pe_layer.forward_with_coords(points + 0.5, self.input_image_size)  # + 0.5: pixel centre
        labels = labels[..., None]
        # Rows -1, 0, 1: what each label adds to its point's encoding (-1 replaces it).
        label_embed = torch.cat(
            [self.not_a_point_embed.weight, self.point_embeddings[0].weight, self.point_embeddings[1].weight]
        )
        embedding = torch.where(labels == -1, 0.0, embedding) + label_embed[labels[..., 0] + 1]
        if pad:
            padding = self.not_a_point_embed.weight.expand(embedding.shape[0], 1, -1)
            embedding = torch.cat([embedding, padding], dim=1)
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return embedding + corner_embed

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts for B prompt rows.

        Args:
            points: coordinates ``(B, N, 2)`` and labels ``(B, N)`` (1 foreground, 0 background, -1 padding).
            boxes: ``(B, 4)`` XYXY.
            masks: ``(B, 1, 4h, 4w)``.

        Returns:
            sparse ``(B, N', C)`` and dense ``(B, C, h, w)`` embeddings.
        """
        if points is not None:
            batch = points[0].shape[0]
        elif boxes is not None:
            batch = boxes.shape[0]
        elif masks is not None:
            batch = masks.shape[0]
        else:
            batch = 1
        weight = self.no_mask_embed.weight
        parts = []
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if len(parts) == 1:
            sparse = parts[0]
        else:
            sparse = torch.cat(parts or [weight.new_empty((batch, 0, self.embed_dim))], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = weight.reshape(1, -1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return sparse, dense
