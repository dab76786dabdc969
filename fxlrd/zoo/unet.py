"""U-Net (Ronneberger, Fischer and Brox, 2015) with padded convolutions, the form most code
uses: the output has the input's size.

An encoder of double 3×3 conv (each followed by batch norm and ReLU) blocks, halving the size
with 2×2 max pooling and doubling the channels at each level; a decoder that doubles the size
with a 2×2 stride-2 transposed convolution, concatenates the encoder's feature map of that
level (the skip connection) and runs a double conv; a 1×1 conv head.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet", "unet"]


class DoubleConv(nn.Sequential):
    """conv 3×3 → batch norm → ReLU, twice."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )  # fmt: skip


class UNet(nn.Module):
    """``(N, in_channels, H, W)`` → ``(N, num_classes, H, W)`` logits; H and W divisible by
    ``2**depth``.

    Args:
        in_channels: the image's channels.
        num_classes: output channels (one logit per class and pixel).
        width: channels of the first level (64 in the paper); level i has ``width·2**i``.
        depth: pooling steps (4 in the paper).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 64, depth: int = 4):
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.stem = DoubleConv(in_channels, widths[0])
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), DoubleConv(a, b)) for a, b in zip(widths, widths[1:]))
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths, widths[1:]))
        self.decode = nn.ModuleList(DoubleConv(2 * a, a) for a in widths[:-1])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for i in reversed(range(len(self.up))):
            h = self.decode[i](torch.cat([skips.pop(), self.up[i](h)], 1))
        return self.head(h)


def unet(in_channels: int = 3, num_classes: int = 2, width: int = 64, depth: int = 4) -> UNet:
    """The paper's U-Net (64 to 1024 channels, four levels), padded: 31.0 M parameters."""
    return UNet(in_channels, num_classes, width, depth)
