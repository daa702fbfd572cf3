"""The SAM-Med2D adapter that runs beside the MLP of every encoder block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import store_weight_in_memory_order
from .onednn_linear import OneDnnLinear, linear


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
            OneDnnLinear(dim, hidden, bias=False), nn.ReLU(), OneDnnLinear(hidden, dim, bias=False), nn.Sigmoid()
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()
        # After the initialisation, which fills a weight in memory order: re-laid first, a seed would give other values.
        store_weight_in_memory_order(self.spatial[0], (0, 2, 3, 1))  # (Cout, kh, kw, Cin): conv2d_by_matmul
        store_output_major(self.spatial[2])

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out) initialisation, as the published code gives fresh adapters."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        gate = self.channel(x.mean(dim=(1, 2)))
        gated = x * gate[:, None, None, :]
        if torch.onnx.is_in_onnx_export():
            # The same map through the layers: ONNX runtimes have (transposed) convolution kernels.
            return self.norm(x + self.spatial(gated.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        down, down_hw = conv2d_by_matmul(gated, self.spatial[0])
        up = conv_transpose_by_matmul(F.relu(down), down_hw, self.spatial[2])
        return self.norm(x + F.relu(up).permute(0, 2, 3, 1))


def conv2d_by_matmul(x: torch.Tensor, layer: nn.Conv2d) -> tuple[torch.Tensor, tuple[int, int]]:
    """``layer`` applied to a channels-last grid, as the gathering of each output pixel's receptive field and one
    matrix product, returned channel-major.

    Same sums as the convolution. Each output pixel's ``(kh, kw, Cin)`` field is one strided view of the zero-padded
    grid, gathered in one copy (0.09 ms for the adapter's, 768 channels at 16x16 on two cores, against 0.41 ms for
    an ``unfold`` of the channel-first view), and the weight, stored ``(Cout, kh, kw, Cin)`` (the adapter's
    ``spatial.0``), is the left factor in place.
    The few output pixels (64 at 256 input) are the right factor: in oneDNN
    (:func:`lib.modeling.onednn_linear.linear`), with the pixels as the "weight" of the product, which runs faster
    than the transposed one.

    ``x``: ``(B, H, W, Cin)`` -> ``(Cout, B * Ho * Wo)`` (columns ordered image, then pixel) and ``(Ho, Wo)``.
    """
    batch, height, width, channels = x.shape
    kernel, stride, padding, dilation = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    out_hw = tuple(
        (size + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i, size in enumerate((height, width))
    )
    if torch.is_grad_enabled():
        # Training: unfold's gradient is a fold, where the strided view's would scatter (a training step took 10% more).
        columns = F.unfold(x.permute(0, 3, 1, 2), kernel, dilation=dilation, padding=padding, stride=stride)
        fields = columns.view(batch, channels, -1, columns.shape[-1]).permute(0, 3, 2, 1).reshape(-1, columns.shape[1])
    else:
        padded = F.pad(x, (0, 0, padding[1], padding[1], padding[0], padding[0]))
        s_batch, s_row, s_col, s_channel = padded.stride()
        fields = padded.as_strided(
            (batch, *out_hw, *kernel, channels),
            (s_batch, stride[0] * s_row, stride[1] * s_col, dilation[0] * s_row, dilation[1] * s_col, s_channel),
        ).reshape(batch * out_hw[0] * out_hw[1], -1)  # (B * Ho * Wo, kh * kw * Cin)
    out = linear(layer.weight.permute(0, 2, 3, 1).reshape(layer.out_channels, -1), fields)  # weight @ fields^T
    if layer.bias is not None:
        out = out + layer.bias[:, None]
    return out, out_hw  # type: ignore[return-value]


def conv_transpose_by_matmul(x: torch.Tensor, in_hw: tuple[int, int], layer: nn.ConvTranspose2d) -> torch.Tensor:
    """``layer`` applied to channel-major pixels, as one matrix product and an overlap-add of its taps.

    Same sums as the transposed convolution; on CPU about 3x faster for the adapter's 4x4 stride-2 one. The weight,
    stored output-major (:func:`store_output_major`), is read in place as the ``(Cout * kh * kw, Cin)`` left factor,
    and the product, in oneDNN with the pixels as its "weight" (:func:`lib.modeling.onednn_linear.linear`), comes
    out tap by tap for :func:`overlap_add`.

    ``x``: ``(Cin, B * h * w)`` of B ``(h, w)`` grids (as :func:`conv2d_by_matmul` returns them) ->
    ``(B, Cout, H, W)`` with ``H = (h - 1) * stride - 2 * padding + kernel``.
    """
    (height, width), kernel = in_hw, layer.kernel_size
    # weight (Cin, Cout, kh, kw): every input pixel spreads over a kh x kw patch of every output channel.
    columns = linear(layer.weight.reshape(layer.in_channels, -1).t(), x.t())  # (Cout * kh * kw, B * h * w)
    taps = columns.view(layer.out_channels, *kernel, -1, height, width).permute(3, 0, 1, 2, 4, 5)
    out = overlap_add(taps, layer.stride, layer.padding)
    if layer.bias is not None:
        out = out + layer.bias[:, None, None]
    return out


def overlap_add(taps: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """Sum the ``(kh, kw)`` patch each input pixel spreads: ``taps`` ``(B, C, kh, kw, h, w)`` -> ``(B, C, H, W)``,
    ``H = (h - 1) * stride - 2 * padding + kh``, cropped by ``padding``.

    What ``F.fold`` (col2im) computes, as one strided sum per tap of the kernel: twice as fast for the adapter's 4x4
    stride-2 one (0.6 against 1.2 ms on two cores, 768 channels at 8x8), in the same order of sums. With gradients
    it is ``fold``, whose gradient is one ``unfold`` where the sums' would be one slice per tap.
    """
    batch, channels, kernel_h, kernel_w, height, width = taps.shape
    if torch.is_grad_enabled():
        out_hw = (
            (height - 1) * stride[0] - 2 * padding[0] + kernel_h,
            (width - 1) * stride[1] - 2 * padding[1] + kernel_w,
        )
        columns = taps.reshape(batch, channels * kernel_h * kernel_w, height * width)
        return F.fold(columns, out_hw, kernel_size=(kernel_h, kernel_w), stride=stride, padding=padding)
    full_h, full_w = (height - 1) * stride[0] + kernel_h, (width - 1) * stride[1] + kernel_w
    out = taps.new_zeros(batch, channels, full_h, full_w)
    rows_span, cols_span = (height - 1) * stride[0] + 1, (width - 1) * stride[1] + 1
    for i in range(kernel_h):
        for j in range(kernel_w):
            out[:, :, i : i + rows_span : stride[0], j : j + cols_span : stride[1]] += taps[:, :, i, j]
    return out[:, :, padding[0] : full_h - padding[0], padding[1] : full_w - padding[1]]


def store_output_major(layer: nn.ConvTranspose2d) -> None:
    """Store a transposed convolution's weight ``(Cin, Cout, kh, kw)`` as ``(Cout, kh, kw, Cin)`` contiguous: same
    shape, values and state dict (``load_state_dict`` and optimizers keep the layout), and
    :func:`conv_transpose_by_matmul` reads it in place as a contiguous ``(Cout * kh * kw, Cin)`` matrix."""
    store_weight_in_memory_order(layer, (1, 2, 3, 0))
