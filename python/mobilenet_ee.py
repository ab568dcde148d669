"""An early-exit MobileNetV2-style network for 28x28 grayscale inputs.

The family of the paper's journal version, shrunk for Fashion-MNIST: a
stem, eight inverted-residual blocks (expand 1x1, depthwise 3x3, project
1x1, residual when the shape allows) and a 1x1 head convolution, with three
side branches. mobilenet_ee.toml describes its exits for export.py.

    trunk   stem -> blocks.0 .. blocks.7 -> head   (28x28 -> 14 -> 7 -> 4)
    branch 1 after blocks.2  (24 x 14 x 14)
    branch 2 after blocks.4  (32 x 7 x 7)
    branch 3 after blocks.6  (64 x 4 x 4)
    final    global average pool -> dropout -> linear
"""

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def branch(cin: int, classes: int) -> nn.Sequential:
    """A side branch: 1x1 convolution to 64 channels, global average pool,
    then a linear classifier."""
    return nn.Sequential(conv_bn(cin, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(64, classes))


# (expansion, output channels, stride) per block.
BLOCKS = [(1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1), (6, 64, 2), (6, 64, 1), (6, 96, 1)]
# The trunk block each side branch follows.
BRANCH_AFTER = [2, 4, 6]


class MobileNetEE(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(1, 16, 3)
        blocks, cin, widths = [], 16, []
        for expand, cout, stride in BLOCKS:
            blocks.append(InvertedResidual(cin, cout, stride, expand))
            cin = cout
            widths.append(cout)
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(cin, 256, 1)
        self.branches = nn.ModuleList([branch(widths[b], classes) for b in BRANCH_AFTER])
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(256, classes))

    def forward(self, x):
        """Every exit's logits: [branch 1, branch 2, branch 3, final]."""
        exits = []
        a = self.stem(x)
        for i, block in enumerate(self.blocks):
            a = block(a)
            if i in BRANCH_AFTER:
                exits.append(self.branches[BRANCH_AFTER.index(i)](a))
        a = self.head(a)
        exits.append(self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(a, 1), 1)))
        return exits


def build() -> MobileNetEE:
    return MobileNetEE()
