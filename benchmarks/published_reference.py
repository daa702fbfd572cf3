"""The published SAM-Med2D forward math, re-expressed over this project's modules and weights.

Printed by ``bench_model.py`` as a fidelity reference next to the published code itself (the speed baseline), and
used by a test that checks the optimised encoder and decoder equal it on shapes the goldens do not cover. It
computes what the published code computes, the way it computes it:
``qkv`` on window-padded tokens, relative-position bias added with separate passes, the adapter's convolutions on
permuted views with ``ConvTranspose2d``, the dense positional encoding recomputed per call, and explicit
softmax attention in the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.modeling import SamMed2D
from lib.modeling.image_encoder import Attention, ImageEncoderViT, relative_position_table


def _window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    b, h, w, c = x.shape
    pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)
    return x, (hp, wp)


def _window_unpartition(x: torch.Tensor, ws: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    hp, wp = pad_hw
    b = x.shape[0] // (hp * wp // ws // ws)
    x = x.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1], :].contiguous()


def _attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * attn.num_heads, h * w, -1).unbind(0)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    table_h = relative_position_table(attn.rel_pos_h, h)
    table_w = relative_position_table(attn.rel_pos_w, w)
    r_q = q.reshape(b * attn.num_heads, h, w, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, table_h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, table_w)
    scores = (scores.view(-1, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(-1, h * w, h * w)
    out = (scores.softmax(dim=-1) @ v).view(b, attn.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


def _adapter(adapter: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 3, 1, 2)
    b, c, _, _ = x.shape
    gate = adapter.channel(F.adaptive_avg_pool2d(x, 1).view(b, c)).view(b, c, 1, 1)
    x = x + adapter.spatial(gate * x)
    return adapter.norm(x.permute(0, 2, 3, 1))


def encode(encoder: ImageEncoderViT, x: torch.Tensor) -> torch.Tensor:
    """Published encoder forward: ``(B, 3, S, S)`` -> ``(B, C, S/16, S/16)``."""
    x = encoder.patch_embed(x) + encoder.pos_embed
    for block in encoder.blocks:
        shortcut = x
        h = block.norm1(x)
        if block.window_size > 0:
            hw = (h.shape[1], h.shape[2])
            h, pad_hw = _window_partition(h, block.window_size)
            h = _window_unpartition(_attention(block.attn, h), block.window_size, pad_hw, hw)
        else:
            h = _attention(block.attn, h)
        x = shortcut + h
        normed = block.norm2(x)
        x = x + block.mlp(normed)
        if block.Adapter is not None and block.adapter_enabled:
            x = x + _adapter(block.Adapter, normed)
    return encoder.neck(x.permute(0, 3, 1, 2))


def _decoder_attention(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
    q, k, v = (attn.separate_heads(t) for t in (q, k, v))
    scores = (q @ k.permute(0, 1, 3, 2)) / (q.shape[-1] ** 0.5)
    out = scores.softmax(dim=-1) @ v
    b, n_heads, n_tokens, c = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n_tokens, n_heads * c))


def decode_all_masks(
    model: SamMed2D, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Published mask decoder: every output token's low-res mask ``(B, T, 4h, 4w)`` and IoU ``(B, T)``."""
    decoder = model.mask_decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = image_embeddings + dense
    pos_src = torch.repeat_interleave(model.prompt_encoder.get_dense_pe(), tokens.shape[0], dim=0)
    b, c, h, w = src.shape
    transformer = decoder.transformer
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = pos_src.flatten(2).permute(0, 2, 1)
    queries = tokens
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = _decoder_attention(layer.self_attn, queries, queries, queries)
        else:
            q = queries + tokens
            queries = queries + _decoder_attention(layer.self_attn, q, q, queries)
        queries = layer.norm1(queries)
        queries = layer.norm2(
            queries + _decoder_attention(layer.cross_attn_token_to_image, queries + tokens, keys + key_pe, keys)
        )
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(
            keys + _decoder_attention(layer.cross_attn_image_to_token, keys + key_pe, queries + tokens, queries)
        )
    attn_out = _decoder_attention(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys)
    hs = transformer.norm_final_attn(queries + attn_out)
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
    hyper_in = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(hs[:, 0, :])


def decode(
    model: SamMed2D,
    image_embeddings: torch.Tensor,
    point_coords: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    mask_inputs: torch.Tensor | None,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Published prompt encoder + decoder + best-mask selection (one prompt row, as the published predictor)."""
    points = (point_coords, point_labels) if point_coords is not None else None
    sparse, dense = model.prompt_encoder(points, boxes, mask_inputs)
    masks, iou = decode_all_masks(model, image_embeddings, sparse, dense)
    sl = slice(1, None) if multimask_output else slice(0, 1)
    masks, iou = masks[:, sl], iou[:, sl]
    if multimask_output:
        best = torch.argmax(iou, dim=1)
        iou = iou.max(dim=1, keepdim=True).values
        masks = masks[:, best]
    return masks, iou
