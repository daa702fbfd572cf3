"""Linear layers whose inference product on a CPU runs in oneDNN rather than in the BLAS library (MKL).

PyTorch's CPU builds multiply ``nn.Linear`` through MKL, which runs AVX2 code on AMD processors: on a Zen 5 core
(AVX-512 at full width) its products reach 80-90 GF/s, where oneDNN's, on the same weights, reach 180-200 GF/s (one
thread; 350-400 against 135-165 at two). On Intel processors MKL runs AVX-512 too, and only the encoder's large
products gain from oneDNN (:func:`min_multiply_adds_for`). The sums are the same in another order (within a few 1e-7
of the largest output, as between thread counts).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lib.common.cpu import cpu_field


def min_multiply_adds_for(vendor: str) -> int:
    """The smallest product (multiply-adds) worth running in oneDNN on a CPU of ``vendor``.

    oneDNN's call costs about 15 us more than MKL's. Where MKL runs AVX2 code (AMD), oneDNN wins from about 2M
    multiply-adds (a click's 7 prompt tokens by a 256x256 weight: 0.46M; its MLPs 3.7M). Where MKL runs its AVX-512
    kernels (Intel), a click's products are faster in MKL, the largest (its up-scaling, 17M) included: on a 2-core
    Xeon with AMX, a point click took 2.31-2.41 ms with every decoder product in MKL against 2.61-2.66 ms with the
    AMD rule, while the encoder's products (150M and more) stay faster in oneDNN (0.255 against 0.299 s an image).
    """
    return 2**26 if vendor == "GenuineIntel" else 2**21


# Products from this size up run in oneDNN on this machine (see min_multiply_adds_for).
ONEDNN_MIN_MULTIPLY_ADDS = min_multiply_adds_for(cpu_field("vendor_id"))

# Rows oneDNN is told to expect when it packs. The packed layout serves every row count; this one suits a few prompt
# tokens to a few hundred rows (a batch of prompts) alike.
PACKING_ROWS = 64


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear product (the x86 and ARM CPU builds of PyTorch do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` runs in oneDNN: a product of at least ``ONEDNN_MIN_MULTIPLY_ADDS``, for inference
    (no gradients) on a CPU in fp32, not under autocast (the bf16 encoder) and not while exporting to ONNX, scripting
    or compiling, where the published ``F.linear`` is kept. The tracer (the server's decoder graphs,
    :mod:`lib.serving.decoder_graphs`) records the oneDNN product (:func:`onednn_product`)."""
    return (
        x.numel() * weight.shape[0] >= ONEDNN_MIN_MULTIPLY_ADDS
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.onnx.is_in_onnx_export()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and onednn_available()
    )


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's ``x @ weight.T + bias``; ``weight`` plain (any strides) or packed (:class:`PackedLinear`)."""
    if torch.jit.is_tracing():
        # The tracer cannot record the empty list of post-op scalars from Python; a scripted call records it typed.
        return _scripted_product()(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def _scripted_product() -> torch.jit.ScriptFunction:
    """:func:`onednn_product` as TorchScript, compiled on first use (only builds with oneDNN have the operator)."""

    def product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
        no_scalars: list[Optional[Union[int, float, complex]]] = []  # noqa: UP007, UP045 (TorchScript's typing)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", no_scalars, "")

    return torch.jit.script(product)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``x`` ``(..., in)``, ``weight`` ``(out, in)``, any strides), in oneDNN where
    :func:`onednn_applies`."""
    if not onednn_applies(x, weight):
        return F.linear(x, weight, bias)
    return onednn_product(x, weight, bias)


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict, training computation and gradients) whose inference product on a
    CPU in fp32 runs in oneDNN (:func:`linear`); with gradients on, while exporting, and on other devices and dtypes it
    is ``F.linear`` as published."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not onednn_applies(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        return onednn_product(x, self.onednn_weight(), self.bias)

    def onednn_weight(self) -> torch.Tensor:
        """The weight oneDNN multiplies by: the parameter itself, read in place."""
        return self.weight


class PackedLinear(OneDnnLinear):
    """:class:`OneDnnLinear` that multiplies by a copy of its weight packed once in oneDNN's blocked layout.

    The decoder's MLPs multiply a click's 7 or so prompt tokens ``(B, n, 256)`` by 2 MB weights; for so few rows
    oneDNN reads a plain weight slowly, the more so when other work has pushed it out of the caches, and the packed
    copy halves that (7x256->2048: 65 against 106 us on a Zen 5 core, 177 us in MKL). The copy is made by the first
    inference call and again after the weight may have changed: when its version counter moved (``load_state_dict``,
    a model swap in place, most optimizer steps), and after any forward with gradients on or a ``train()`` /
    ``eval()`` call, because a fused optimizer step (``Adam(fused=True)``, the recipe's) changes the weight without
    moving the counter. It costs ``4 * in * out`` bytes and is never saved or copied; where MKL runs these products
    (Intel processors, :func:`min_multiply_adds_for`) it is never made.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed: tuple[tuple[int, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.packed = None  # a training step may follow that leaves the version counter where it is
        return super().forward(x)

    def onednn_weight(self) -> torch.Tensor:
        weight = self.weight
        if weight.is_inference():  # no version counter to see a change by
            return weight
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
