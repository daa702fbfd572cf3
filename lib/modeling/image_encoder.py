"""ViT image encoder of SAM-Med2D: SAM's windowed ViT with an adapter in every block.

Faithful to the published network (same parameters, same outputs) but computed with less work:

* Windowed blocks project ``qkv`` on the real tokens only. The published code pads the token grid to a multiple of
  the window first, and projects the padding too; a padded (zero) token projects to the ``qkv`` bias, so the padded
  keys and values are filled in with that bias instead of being computed.
* The decomposed relative-position bias enters one fused ``scaled_dot_product_attention`` call as its additive
  mask, instead of separate matmul, add, softmax and matmul passes over the ``(L, L)`` scores.
* Only the real tokens are queries of the windowed attention (the padded ones are keys and values there, but their
  outputs are dropped): 256 queries instead of 784 at 256 input, and the output projection runs on the real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter
from .common import LayerNorm2d, MLPBlock
from .onednn_linear import OneDnnLinear


def relative_position_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis of a ``size``-long grid.

    Args:
        rel_pos: ``(L, C)`` table; resized linearly to ``2 * size - 1`` rows when its length differs.
        size: number of query (and key) positions along the axis.

    Returns:
        ``(size, size, C)`` where entry ``[i, j]`` is the embedding of the offset ``i - j``.
    """
    max_rel_dist = 2 * size - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = rel_pos.reshape(-1, max_rel_dist).permute(1, 0)
    coords = torch.arange(size, device=rel_pos.device)
    relative = coords[:, None] - coords[None, :] + (size - 1)
    return rel_pos[relative]


class Attention(nn.Module):
    """Multi-head self-attention over a token grid, or within its windows, with decomposed relative-position bias."""

    def __init__(self, dim: int, num_heads: int, grid_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = OneDnnLinear(dim, dim * 3, bias=True)
        self.proj = OneDnnLinear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid_size - 1, head_dim))

    def relative_position_tables(self, kv_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`relative_position_table` of each axis of a ``kv_hw`` grid: ``(Hk, Hk, head_dim)``,
        ``(Wk, Wk, head_dim)``; every window of a forward shares them."""
        return relative_position_table(self.rel_pos_h, kv_hw[0]), relative_position_table(self.rel_pos_w, kv_hw[1])

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_hw: tuple[int, int],
        tables: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Attention of the queries of a ``q_hw`` grid over the keys of the grid of ``tables``
        (:meth:`relative_position_tables`) that holds it at its top left (the same grid, or a window with padding
        below and right of its real tokens).

        Args:
            q: ``(B, heads, Hq * Wq, head_dim)``; ``k``, ``v``: ``(B, heads, Hk * Wk, head_dim)``.
            q_hw: ``(Hq, Wq)``, at most ``(Hk, Wk)``.

        Returns:
            ``(B, Hq, Wq, C)``, before the output projection.
        """
        batch, heads, _, _ = q.shape
        height, width = q_hw
        grid_q = q.reshape(batch, heads, height, width, -1)
        table_h = tables[0][:height]  # (Hq, Hk, head_dim)
        table_w = tables[1][:width]  # (Wq, Wk, head_dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h)  # (B, heads, Hq, Wq, Hk)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w)  # (B, heads, Hq, Wq, Wk)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, height * width, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return out.transpose(1, 2).reshape(batch, height, width, -1)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ..., C)`` tokens of a grid -> ``(B, heads, tokens, head_dim)``."""
        return x.reshape(x.shape[0], -1, self.num_heads, x.shape[-1] // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, window_size: int = 0) -> torch.Tensor:
        """``x``: normalised tokens ``(B, H, W, C)`` -> ``(B, H, W, C)``.

        With ``window_size > 0`` attention runs inside non-overlapping windows of the grid padded (with zero tokens,
        as the published encoder pads) to a multiple of the window. The padded tokens are keys and values there, but
        their outputs are dropped, so only the real tokens are queries: 256 instead of 784 at 256 input.
        """
        batch, height, width, dim = x.shape
        qkv = self.qkv(x)
        q, kv = qkv[..., :dim], qkv[..., dim:]
        if window_size <= 0:
            k, v = kv.split(dim, dim=-1)
            grid = (height, width)
            tables = self.relative_position_tables(grid)
            out = self.attend(self.split_heads(q), self.split_heads(k), self.split_heads(v), grid, tables)
            return self.proj(out)
        # A zero (padding) token projects to the bias; computed through the layer so that a quantised one works.
        kv_windows = window_partition(kv, window_size, pad=self.qkv(x.new_zeros(1, dim))[0, dim:])
        out = x.new_empty(batch, height, width, dim)
        tables = self.relative_position_tables((window_size, window_size))
        for i, rows in _window_slices(height, window_size):
            for j, cols in _window_slices(width, window_size):
                k, v = kv_windows[:, i, j].split(dim, dim=-1)
                window_q = self.split_heads(q[:, rows, cols])
                hw = (rows.stop - rows.start, cols.stop - cols.start)
                out[:, rows, cols] = self.attend(window_q, self.split_heads(k), self.split_heads(v), hw, tables)
        return self.proj(out)


def _window_slices(size: int, window_size: int) -> list[tuple[int, slice]]:
    """For each window along an axis: its index and the slice of real positions it holds."""
    return [(i, slice(start, min(start + window_size, size))) for i, start in enumerate(range(0, size, window_size))]


def window_partition(x: torch.Tensor, window_size: int, pad: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C)`` -> windows ``(B, nH, nW, ws, ws, C)``, the grid padded to a multiple of ``window_size``.

    Padded positions hold ``pad`` ``(C,)``. The windows are filled straight from the grid: one copy of the real
    tokens, no padded intermediate.
    """
    batch, height, width, channels = x.shape
    rows, cols = _window_slices(height, window_size), _window_slices(width, window_size)
    shape = (batch, len(rows), len(cols), window_size, window_size, channels)
    windows = pad.to(x.dtype).expand(shape).clone()
    for i, row in rows:
        for j, col in cols:
            windows[:, i, j, : row.stop - row.start, : col.stop - col.start] = x[:, row, col]
    return windows


class Block(nn.Module):
    """Transformer block: ``x + attn(norm1(x))``, then ``x + mlp(n) + adapter(n)`` with ``n = norm2(x)``."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid_size: int, adapter: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, grid_size=window_size if window_size > 0 else grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.Adapter = Adapter(dim) if adapter else None
        self.adapter_enabled = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        x = x + self.attn(self.norm1(x), self.window_size)
        normed = self.norm2(x)
        out = x + self.mlp(normed)
        if self.Adapter is not None and self.adapter_enabled:
            out = out + self.Adapter(normed)
        return out


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: ``(B, 3, H, W)`` -> channels-last ``(B, H/p, W/p, C)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM-Med2D image encoder: ``(B, 3, S, S)`` normalised image -> ``(B, out_chans, S/16, S/16)`` embedding."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        adapter: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                grid_size=grid,
                adapter=adapter,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    @property
    def has_adapters(self) -> bool:
        return any(block.Adapter is not None for block in self.blocks)

    def set_adapters_enabled(self, enabled: bool) -> None:
        """Switch the adapter branch on or off (off is the paper's SAM-Med2D*)."""
        if enabled and not self.has_adapters:
            raise ValueError("this encoder was built without adapters")
        for block in self.blocks:
            block.adapter_enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
