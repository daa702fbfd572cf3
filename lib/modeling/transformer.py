"""SAM's two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention with optional down-projection of the internal dimension.

    ``q``: ``(B, Nq, C)``, ``k``/``v``: ``(B, Nk, C)`` -> ``(B, Nq, C)``.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        internal_dim = embedding_dim // downsample_rate
        if internal_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the internal dim {internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, internal_dim)
        self.k_proj = nn.Linear(embedding_dim, internal_dim)
        self.v_proj = nn.Linear(embedding_dim, internal_dim)
        self.out_proj = nn.Linear(internal_dim, embedding_dim)

    def _separate_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``proj(x)`` split into heads: ``(B, N, C)`` -> ``(B, heads, N, internal_dim / heads)``."""
        return self._separate_heads(proj(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Projected heads (see :meth:`heads`) -> ``(B, Nq, C)``; a batch of 1 (prompt-independent terms computed
        once per image) is shared by the B prompt rows."""
        batch = max(q.shape[0], k.shape[0])
        q, k, v = (t.expand(batch, -1, -1, -1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attend(self.heads(self.q_proj, q), self.heads(self.k_proj, k), self.heads(self.v_proj, v))


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token->image cross-attention, MLP, image->token cross-attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def image_terms(self, keys: torch.Tensor, key_pe: torch.Tensor) -> dict[str, torch.Tensor]:
        """The block's projections of the image tokens ``keys`` ``(B, h*w, C)`` (``key_pe`` the same shape): the
        token->image keys and values and the image->token queries, ``(B, heads, h*w, d)`` each.

        They do not depend on the prompt in the first block, so a server computes them once per image."""
        keys_with_pe = keys + key_pe
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        return {
            "t2i_k": t2i.heads(t2i.k_proj, keys_with_pe),
            "t2i_v": t2i.heads(t2i.v_proj, keys),
            "i2t_q": i2t.heads(i2t.q_proj, keys_with_pe),
        }

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        image_terms: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_terms``: :meth:`image_terms` of ``keys`` when the caller has them."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        terms = image_terms if image_terms is not None else self.image_terms(keys, key_pe)
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        attended = t2i.attend(t2i.heads(t2i.q_proj, queries + query_pe), terms["t2i_k"], terms["t2i_v"])
        queries = self.norm2(queries + attended)
        queries = self.norm3(queries + self.mlp(queries))
        tokens_with_pe = queries + query_pe
        attended = i2t.attend(terms["i2t_q"], i2t.heads(i2t.k_proj, tokens_with_pe), i2t.heads(i2t.v_proj, queries))
        keys = self.norm4(keys + attended)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Decoder transformer.

    ``image_embedding``, ``image_pe``: ``(B, C, h, w)``; ``point_embedding``: ``(B, N, C)``.
    Returns the processed tokens ``(B, N, C)`` and image tokens ``(B, h*w, C)``.
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate, skip_first_layer_pe=i == 0
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def first_layer_terms(self, image_embedding: torch.Tensor, image_pe: torch.Tensor) -> dict[str, torch.Tensor]:
        """The first block's prompt-independent projections (:meth:`TwoWayAttentionBlock.image_terms`) of
        ``image_embedding`` ``(1, C, h, w)`` with ``image_pe`` ``(1, C, h, w)``, to pass to :meth:`forward`."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        return self.layers[0].image_terms(keys, image_pe.flatten(2).transpose(1, 2))

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        first_layer_terms: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``first_layer_terms``: :meth:`first_layer_terms` of this ``image_embedding`` (batch 1, shared by the B
        prompt rows) when the caller has them."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, point_embedding, key_pe, first_layer_terms if i == 0 else None)
        attn_out = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn_out), keys
