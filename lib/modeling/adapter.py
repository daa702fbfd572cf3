"""The SAM-Med2D adapter that runs beside the MLP of every encoder block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Module):
    """Channel attention, then a down/up spatial convolution, added back to the input and normalised.

    ``adapter(n) = LayerNorm(n + spatial(channel(n)))`` with
    ``channel(n) = n * sigmoid(W2 relu(W1 avgpool(n)))`` and
    ``spatial = relu(convT4x4s2p1(relu(conv3x3s2p1(.))))``.

    Input and output are channels-last token grids ``(B, H, W, C)``; H and W must be even.
    Parameter names (``channel.0``, ``channel.2``, ``spatial.0``, ``spatial.2``, ``norm``) follow the published
    checkpoint.
    """

    def __init__(self, dim: int, reduction_ratio: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * reduction_ratio)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.Sigmoid()
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out) initialisation, as the published code gives fresh adapters."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        gate = self.channel(x.mean(dim=(1, 2)))
        # oneDNN runs the strided convolution about 3x faster on a contiguous NCHW tensor than on a permuted view.
        gated = (x * gate[:, None, None, :]).permute(0, 3, 1, 2).contiguous()
        down = F.relu(self.spatial[0](gated))
        up = F.relu(conv_transpose_by_matmul(down, self.spatial[2]))
        return self.norm(x + up.permute(0, 2, 3, 1))


def conv_transpose_by_matmul(x: torch.Tensor, layer: nn.ConvTranspose2d) -> torch.Tensor:
    """``layer(x)`` computed as one matrix product and a ``fold`` (col2im); same result, about 3x faster on CPU.

    ``x``: ``(B, Cin, h, w)`` -> ``(B, Cout, H, W)`` with ``H = (h - 1) * stride - 2 * padding + kernel``.
    """
    batch, in_channels, height, width = x.shape
    kernel = layer.kernel_size
    stride, padding = layer.stride, layer.padding
    out_hw = (
        (height - 1) * stride[0] - 2 * padding[0] + kernel[0],
        (width - 1) * stride[1] - 2 * padding[1] + kernel[1],
    )
    # weight (Cin, Cout, kh, kw) -> columns (B, Cout * kh * kw, h * w)
    columns = layer.weight.reshape(in_channels, -1).t() @ x.reshape(batch, in_channels, height * width)
    out = F.fold(columns, out_hw, kernel_size=kernel, stride=stride, padding=padding)
    if layer.bias is not None:
        out = out + layer.bias[:, None, None]
    return out
