"""Reference models in torchvision's layout and parameter names, for tests and benchmarks.

torchvision does not install beside the CPU torch of every machine, so fxlrd carries its own
definitions; a torchvision state dict loads into them with ``strict=True``. The DCGAN
generator and the U-Net, which torchvision does not have, follow their papers (the models
with transposed convolutions).
"""

from .dcgan import DCGANGenerator, dcgan_generator
from .resnet import Bottleneck, ResNet, resnet50, resnet101, resnet152
from .unet import UNet, unet
from .vit import VisionTransformer, vit_b_16

__all__ = ["ResNet", "Bottleneck", "VisionTransformer", "DCGANGenerator", "UNet", "resnet50", "resnet101", "resnet152",
           "vit_b_16", "dcgan_generator", "unet", "get", "input_shape"]  # fmt: skip

_MODELS = {"resnet50": resnet50, "resnet101": resnet101, "resnet152": resnet152, "vit_b_16": vit_b_16,
           "dcgan_generator": dcgan_generator, "unet": unet}  # fmt: skip


def get(name: str, **kwargs):
    """A zoo model by name (``resnet50``, ``resnet101``, ``resnet152``, ``vit_b_16``, ``dcgan_generator``, ``unet``)."""
    try:
        return _MODELS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {sorted(_MODELS)}") from None


def input_shape(name: str) -> tuple[int, ...]:
    """The shape of one input a zoo model takes (batch 1): an ImageNet image, 1×3×224×224, or
    the DCGAN generator's latent vector, 1×100×1×1."""
    if name not in _MODELS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {sorted(_MODELS)}")
    return (1, 100, 1, 1) if name == "dcgan_generator" else (1, 3, 224, 224)
