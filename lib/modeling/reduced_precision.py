"""Opt-in reduced-precision image encoder: int8 dynamic quantisation of its linear layers, or bf16 autocast.

The encoder is the server's one large cost (a new image or slice); its linear layers hold nearly all its weights and
time. ``int8`` quantises their weights once and their inputs per call (dynamic quantisation; fast on CPUs with VNNI
integer dot products); ``bf16`` holds the weights of the encoder's products in bf16 and runs it under bf16 autocast
(fast where the CPU has AVX512-BF16 or AMX, or on a GPU; half the memory of those weights). Both change the
embedding slightly, so they are off unless asked for; ``bench_model`` prints their speed and their Dice change
against fp32. The decoder stays fp32.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lib.common.cpu import cpu_field
from lib.modeling import SamMed2D
from lib.modeling.image_encoder import ImageEncoderViT
from lib.modeling.onednn_linear import OneDnnLinear

PRECISIONS = ("fp32", "int8", "bf16")
# /proc/cpuinfo flags of the instructions that make each precision fast on a CPU.
NATIVE_FLAGS = {"int8": ("avx512_vnni", "avx_vnni", "amx_int8"), "bf16": ("avx512_bf16", "amx_bf16")}


def cpu_has_native(precision: str) -> bool:
    """Whether this (Linux x86) CPU has instructions for ``int8`` or ``bf16`` matrix products."""
    flags = set(cpu_field("flags").split())
    return any(flag in flags for flag in NATIVE_FLAGS.get(precision, ()))


class Bf16ImageEncoderViT(ImageEncoderViT):
    """:class:`ImageEncoderViT` run under bf16 autocast on its device, returning fp32 embeddings.

    ``set_encoder_precision(model, "bf16")`` gives a model's encoder this class in place: its parameter names, state
    dict and methods stay the fp32 encoder's, so a served bf16 model takes a new version's weights in place (copied
    into its bf16 weights, rounded as autocast rounds them) like an fp32 one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, C, S/16, S/16)`` fp32."""
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return super().forward(x).float()


def set_encoder_precision(model: SamMed2D, precision: str) -> SamMed2D:
    """Switch ``model``'s image encoder to ``precision`` in place (for inference; ``fp32`` leaves it as it is).

    ``int8`` replaces the linear layers by dynamically quantised ones (CPU only), which frees their fp32 weights.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"encoder precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8":
        if model.device.type != "cpu":
            raise ValueError("int8 dynamic quantisation runs on the CPU; use bf16 on a GPU")
        for module in model.image_encoder.modules():
            if isinstance(module, OneDnnLinear):
                # Its quantised replacement is made from it by torch's mapping, which knows nn.Linear by type only.
                module.__class__ = nn.Linear
        with warnings.catch_warnings():
            # torch points eager quantisation users to torchao; this API is what torch itself ships.
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(model.image_encoder, {nn.Linear}, dtype=torch.qint8, inplace=True)
    elif precision == "bf16":
        for module in model.image_encoder.modules():
            # Autocast casts these to bf16 at every call (F.linear its weight and bias; the convolutions, run as
            # products, their weight): cast once, the same values, without re-reading the fp32 weights per encode
            # and in half their memory. A convolution's bias is added outside autocast's products: it stays fp32.
            if isinstance(module, nn.Linear):
                module.to(torch.bfloat16)
            elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                module.weight.data = module.weight.data.to(torch.bfloat16)
        model.image_encoder.__class__ = Bf16ImageEncoderViT
    return model
