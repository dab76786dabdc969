"""Real data for accuracy benchmarks: scikit-learn's handwritten digits, upsampled to 32×32.

A small bottleneck ResNet (fxlrd.zoo's Bottleneck blocks) is trained on a fixed stratified
split; helpers train and evaluate with plain PyTorch.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from fxlrd.zoo import Bottleneck


def digits_data(size: int = 32, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    tr, te = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=digits.target)
    return (x[tr], y[tr]), (x[te], y[te])


class SmallResNet(nn.Module):
    """Bottleneck ResNet for 1×32×32 inputs: 3 stages of 2 blocks, 64/128/256 channels out."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], 32
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            out = planes * 4
            down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            layers.append(nn.Sequential(Bottleneck(inplanes, planes, stride, down), Bottleneck(out, planes)))
            inplanes = out
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    x, y = data
    model.eval()
    correct = sum((model(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum().item() for i in range(0, len(y), 256))
    return 100.0 * correct / len(y)


def train_epoch(model: nn.Module, data, optimizer, *, batch: int = 64, seed: int = 0, on_step=None) -> float:
    """One epoch of SGD; returns seconds taken."""
    x, y = data
    model.train()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    t0 = time.perf_counter()
    for i in range(0, len(y), batch):
        idx = order[i : i + batch]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
        if on_step is not None:
            on_step()
    return time.perf_counter() - t0
