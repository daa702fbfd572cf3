"""SAM's two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock
from .onednn_linear import OneDnnLinear, PackedLinear


class Attention(nn.Module):
    """Multi-head attention with optional down-projection of the internal dimension.

    ``q``: ``(B, Nq, C)``, ``k``/``v``: ``(B, Nk, C)`` -> ``(B, Nq, C)``.

    In the decoder one side is a few prompt tokens (``n``, about 7) and the other the many image tokens (``N`` = h*w,
    256 at 256 input). Projecting the many tokens costs ``N C D`` per projection (``D`` the internal dim), but each
    head only ever meets them through ``n`` dot products, so :meth:`attend_to_many` and :meth:`attend_from_many` fold
    the projection onto the few side (``heads * n`` columns instead of ``D``): the same sums, regrouped, in less
    than half the arithmetic while ``heads * n < D`` (:meth:`folds`), which is every prompt of up to 10 clicks.
    Inference only: see :meth:`folds`.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.internal_dim = embedding_dim // downsample_rate
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the internal dim {self.internal_dim}")
        self.q_proj = OneDnnLinear(embedding_dim, self.internal_dim)
        self.k_proj = OneDnnLinear(embedding_dim, self.internal_dim)
        self.v_proj = OneDnnLinear(embedding_dim, self.internal_dim)
        self.out_proj = OneDnnLinear(self.internal_dim, embedding_dim)

    def separate_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, internal_dim)`` -> ``(B, heads, N, internal_dim / heads)``."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _head_weight(self, proj: nn.Linear) -> torch.Tensor:
        """``proj.weight`` ``(D, C)`` as ``(heads, D / heads, C)``."""
        return proj.weight.view(self.num_heads, -1, proj.weight.shape[1])

    def folds(self, few: int) -> bool:
        """Whether to fold the projections onto ``few`` tokens: when it is cheaper, and not while training.

        Folded, the key bias of :meth:`attend_to_many` cancels in the softmax and leaves the graph, so it would get no
        gradient (and no weight decay) where the published training loop gives it a rounding-sized one: training
        keeps the published computation, gradient for gradient (``tests/test_training_step.py``).
        """
        return self.num_heads * few < self.internal_dim and not torch.is_grad_enabled()

    def heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``proj(x)`` split into heads: ``(B, N, C)`` -> ``(B, heads, N, internal_dim / heads)``."""
        return self.separate_heads(proj(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Projected heads (see :meth:`heads`) -> ``(B, Nq, C)``; a batch of 1 (prompt-independent terms computed
        once per image) is shared by the B prompt rows."""
        if q.shape[0] != k.shape[0]:
            batch = max(q.shape[0], k.shape[0])
            q, k, v = q.expand(batch, -1, -1, -1), k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attend(self.heads(self.q_proj, q), self.heads(self.k_proj, k), self.heads(self.v_proj, v))

    def attend_to_many(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for few queries ``(B, n, C)`` over many keys and values ``(B or 1, N, C)``, folded where
        :meth:`folds` says so.

        Per head, ``q_h (k W_h + b_h)^T = (q_h W_h) k^T + const`` (a constant per query leaves the softmax as it is)
        and ``softmax(.) (v V_h + c_h) = (softmax(.) v) V_h + c_h`` (the weights sum to 1): the many tokens are
        read twice by ``heads * n`` rows instead of being projected to ``D`` columns twice.
        """
        b, n, _ = q.shape
        if not self.folds(n):
            return self(q, k.expand(b, -1, -1), v.expand(b, -1, -1))
        heads = self.num_heads
        q_heads = self.heads(self.q_proj, q) * (self.internal_dim // heads) ** -0.5  # (B, H, n, d)
        q_keys = (q_heads @ self._head_weight(self.k_proj)).reshape(b, heads * n, -1)  # (B, H n, C)
        weights = torch.softmax(q_keys @ k.transpose(1, 2), dim=-1)  # (B, H n, N)
        read = (weights @ v).view(b, heads, n, -1)  # (B, H, n, C)
        out = read @ self._head_weight(self.v_proj).transpose(1, 2) + self.v_proj.bias.view(heads, 1, -1)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def attend_from_many(
        self, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, q_heads: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`forward` for many queries ``(B or 1, N, C)`` over few keys and values ``(B, n, C)``, folded where
        :meth:`folds` says so.

        Per head, ``k_h (q Q_h + b_h)^T = (k_h Q_h) q^T + k_h b_h^T``, and the output projection of the heads'
        ``softmax(.) v_h`` is ``sum_h softmax(.)_h (v_h O_h)``: the many tokens meet one ``(H n, C)`` matrix on each
        side. ``q_heads``: the projected queries ``(B or 1, H, N, d)`` when the caller has them (then ``q`` is not
        read). The logits are laid out ``(B, H, n, N)`` so that the softmax runs over a strided axis of length ``n``
        with ``N`` contiguous, many times faster on CPU than a softmax over a last axis of 7.
        """
        if not self.folds(k.shape[1]):
            q_heads = q_heads if q_heads is not None else self.heads(self.q_proj, q)
            return self.attend(q_heads, self.heads(self.k_proj, k), self.heads(self.v_proj, v))
        k_heads = self.heads(self.k_proj, k) * (self.internal_dim // self.num_heads) ** -0.5  # (B, H, n, d)
        b, heads, n, _ = k_heads.shape
        if q_heads is None:
            keys_q = (k_heads @ self._head_weight(self.q_proj)).reshape(b, heads * n, -1)  # (B, H n, C)
            bias = k_heads @ self.q_proj.bias.view(heads, -1, 1)  # (B, H, n, 1)
            logits = (keys_q @ q.transpose(1, 2)).view(b, heads, n, -1) + bias
        else:
            logits = k_heads @ q_heads.transpose(2, 3)  # (B, H, n, N)
        weights = torch.softmax(logits, dim=2).view(b, heads * n, -1)  # (B, H n, N)
        out_weight = self.out_proj.weight.view(self.out_proj.out_features, heads, -1).permute(1, 2, 0)
        values_out = (self.heads(self.v_proj, v) @ out_weight).view(b, heads * n, -1)  # (B, H n, C)
        return torch.baddbmm(self.out_proj.bias, weights.transpose(1, 2), values_out)


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
        # The prompt tokens' MLP reads the decoder's largest weights for a few rows: packed where oneDNN runs it
        # (PackedLinear).
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation, linear=PackedLinear)
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

        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        keys_with_pe = None if image_terms is not None else keys + key_pe
        if image_terms is not None:
            attended = t2i.attend(t2i.heads(t2i.q_proj, queries + query_pe), image_terms["t2i_k"], image_terms["t2i_v"])
        else:
            attended = t2i.attend_to_many(queries + query_pe, keys_with_pe, keys)
        queries = self.norm2(queries + attended)
        queries = self.norm3(queries + self.mlp(queries))
        tokens_with_pe = queries + query_pe
        i2t_q = image_terms["i2t_q"] if image_terms is not None else None
        attended = i2t.attend_from_many(keys_with_pe, tokens_with_pe, queries, i2t_q)
        keys = self.norm4(keys + attended)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Decoder transformer.

    ``image_embedding``: ``(B, C, h, w)``; ``image_pe``: ``(B or 1, C, h, w)``; ``point_embedding``: ``(B, N, C)``.
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
        """What :meth:`forward` computes from ``image_embedding`` ``(1, C, h, w)`` and ``image_pe`` ``(1, C, h, w)``
        whatever the prompt, to pass to it: the image tokens ``keys`` and ``key_pe`` ``(1, h*w, C)`` laid out token
        by token (sums with the channel-major embedding read it across the grain, about 10x slower), and the first
        block's projections (:meth:`TwoWayAttentionBlock.image_terms`)."""
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        return {"keys": keys, "key_pe": key_pe, **self.layers[0].image_terms(keys, key_pe)}

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        first_layer_terms: dict[str, torch.Tensor] | None = None,
        outputs: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``first_layer_terms``: :meth:`first_layer_terms` of this ``image_embedding`` (batch 1, shared by the B
        prompt rows) when the caller has them; only ``key_pe`` of them where the embedding is new (a mask prompt).

        ``outputs``: the number of leading tokens whose outputs are returned, ``(B, outputs, C)`` (``None``: all).
        The final attention runs for those only: the decoder reads its IoU and mask tokens' outputs, never the
        prompt tokens' (2 of a click's 7), and each query's attention is its own.
        """
        terms = first_layer_terms or {}
        keys = terms["keys"] if "keys" in terms else image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = terms["key_pe"] if "key_pe" in terms else image_pe.flatten(2).transpose(1, 2).contiguous()
        block_terms = terms if "t2i_k" in terms else None
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, point_embedding, key_pe, block_terms if i == 0 else None)
        queries, point_embedding = queries[:, :outputs], point_embedding[:, :outputs]
        attn_out = self.final_attn_token_to_image.attend_to_many(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn_out), keys
