"""A linear layer whose inference product on a CPU reads a copy of its weight packed once for oneDNN."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Rows oneDNN is told to expect when it packs. The packed layout serves every row count; this one suits a few prompt
# tokens to a few hundred rows (a batch of prompts) alike.
PACKING_ROWS = 64


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed linear product (the CPU builds of PyTorch do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and training computation) that, for inference on a CPU in fp32,
    multiplies by a copy of its weight packed in oneDNN's blocked layout.

    The decoder's MLPs multiply a click's 7 or so prompt tokens ``(B, n, 256)`` by 2 MB weights. MKL's product for so
    few rows reads the weight slowly, the more so when other work has pushed it out of the caches: 0.45-0.5 ms per
    layer, against 0.2-0.3 ms for oneDNN's on the packed copy (the same sums in another order, within 2e-6). The
    copy is made by the first inference call and again after the weight may have changed: when its version counter
    moved (``load_state_dict``, a model swap in place, most optimizer steps), and after any forward with gradients
    on or a ``train()`` / ``eval()`` call, because a fused optimizer step (``Adam(fused=True)``, the recipe's)
    changes the weight without moving the counter. It costs ``4 * in * out`` bytes and is never saved. With
    gradients on (training), while tracing or exporting, and on other devices and dtypes the layer is ``F.linear``
    as published.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed: tuple[tuple[int, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed_weight(x)
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The packed weight for an inference product with ``x``, or ``None`` where the plain product runs."""
        weight = self.weight
        if torch.is_grad_enabled():
            self.packed = None  # a training step may follow that leaves the version counter where it is
            return None
        if (
            torch.jit.is_tracing()
            or torch.jit.is_scripting()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or weight.dtype != torch.float32
            or weight.is_inference()  # no version counter to see a change by
            or not packing_available()
        ):
            return None
        key = (weight.data_ptr(), weight._version)
        cached = self.packed
        if cached is None or cached[0] != key:
            cached = self.packed = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKING_ROWS))
        return cached[1]

    def train(self, mode: bool = True) -> PackedLinear:
        self.packed = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        # A packed tensor has no storage to copy or pickle; a copy packs its own at its first inference call.
        return {**super().__getstate__(), "packed": None}
