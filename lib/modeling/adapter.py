"""The SAM-Med2D adapter that runs beside the MLP of every encoder block."""

from __future__ import annotations

import torch
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
        # The convolutions run on a channels-last view: no copy, and oneDNN prefers that layout.
        spatial_in = (x * gate[:, None, None, :]).permute(0, 3, 1, 2)
        spatial = self.spatial(spatial_in).permute(0, 2, 3, 1)
        return self.norm(x + spatial)
