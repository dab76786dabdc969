"""The DCGAN generator (Radford, Metz and Chintala, 2016): a latent vector to a 64×64 image
through five transposed convolutions (4×4 kernels, stride 2 after the first), each but the
last followed by batch norm and ReLU, the last by tanh.

A model made of transposed convolutions alone, for checking and timing their decomposition;
the layout follows the paper's architecture guidelines (no biases before batch norm, no
pooling or fully connected layers).
"""

from __future__ import annotations

from torch import nn

__all__ = ["DCGANGenerator", "dcgan_generator"]


class DCGANGenerator(nn.Sequential):
    """``(N, latent, 1, 1)`` → ``(N, channels, 64, 64)`` in ``[-1, 1]``.

    Args:
        latent: the latent vector's size (100 in the paper).
        width: the last hidden layer's channels; each earlier one has twice as many
            (``width·8`` after the first layer).
        channels: the image's channels.
    """

    def __init__(self, latent: int = 100, width: int = 64, channels: int = 3):
        widths = [width * 8, width * 4, width * 2, width]
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent, widths[0], 4, 1, 0, bias=False)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False)]
        layers += [nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True), nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False),
                   nn.Tanh()]  # fmt: skip
        super().__init__(*layers)
        self.latent = latent


def dcgan_generator(latent: int = 100, width: int = 64, channels: int = 3) -> DCGANGenerator:
    """The paper's generator: 100-d latent, 64×64 RGB images, 3.6 M parameters."""
    return DCGANGenerator(latent, width, channels)
