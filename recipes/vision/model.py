"""A small ResNet for digit images, with its norm layers chosen by name.

The network is built with BatchNorm2d and then converted: `syncbatchnorm` by
torch's `SyncBatchNorm.convert_sync_batchnorm`, `evonorm_b0` / `evonorm_s0` by
`gradlane.layers.convert_norms` (each norm+ReLU pair becomes one EvoNorm, the
norm before the residual add its affine-only form).
"""

from __future__ import annotations

import torch
from torch import nn

from gradlane.layers import convert_norms

NORMS = ("batchnorm", "syncbatchnorm", "evonorm_b0", "evonorm_s0")


class Block(nn.Module):
    """conv-norm-relu-conv-norm, plus a (projected) shortcut, then relu."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, three stages (width, 2 width, 4 width; strides 1, 2, 2), pooling, classifier."""

    def __init__(
        self, width: int = 16, blocks: int = 1, num_classes: int = 10, in_channels: int = 1
    ):
        super().__init__()
        if width < 1 or blocks < 1:
            raise ValueError(f"model.width={width} and model.blocks={blocks} must be >= 1")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2)):
            cout = width * 2**i
            stages.append(
                nn.Sequential(*(Block(cin if b == 0 else cout, cout, stride if b == 0 else 1)
                                for b in range(blocks)))
            )  # fmt: skip
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def build_resnet(norm: str = "batchnorm", **kwargs) -> nn.Module:
    """A `ResNet(**kwargs)` whose norm layers are `norm` (one of NORMS)."""
    if norm not in NORMS:
        raise ValueError(f"model.norm={norm!r} is not allowed; allowed: {', '.join(NORMS)}")
    model = ResNet(**kwargs)
    if norm == "syncbatchnorm":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if norm.startswith("evonorm"):
        return convert_norms(model, norm, strict=True, without_act="affine")
    return model
