"""Small models of the meta-learning literature, used by the tests and the benchmark.

``MLP`` (the sinusoid regression net is ``MLP(1, (40, 40), 1)``), ``Conv4`` (the 4-block conv net of
MAML's Omniglot / miniImageNet runs, with BatchNorm) and ``CaviaMLP`` (an MLP whose input is
concatenated with a per-task context vector, as in CAVIA).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class MLP(nn.Sequential):
    """``Linear -> ReLU -> ... -> Linear``.

    Args:
        in_features: input size.
        hidden: hidden layer sizes.
        out_features: output size.
        activation: module class used between layers (``nn.ReLU`` by default; ``nn.Tanh`` gives a
            smooth net, convenient for finite-difference tests).

    Example:
        >>> net = MLP(1, (40, 40), 1)  # the sinusoid regression net of MAML
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, activation=nn.ReLU):
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


def sinusoid_mlp() -> MLP:
    """The 1-40-40-1 ReLU regression net of MAML's sinusoid experiment."""
    return MLP(1, (40, 40), 1)


class Conv4(nn.Module):
    """Four ``conv3x3 -> BatchNorm -> ReLU -> max-pool 2`` blocks and a linear head.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for miniImageNet).
        filters: channels of every conv layer (64 or 32 in the literature).
        n_way: classes of the head.
        image_size: side of the square input (28 or 84).

    Example:
        >>> net = Conv4(1, 64, 5, 28)
        >>> net(torch.randn(5, 1, 28, 28)).shape
        torch.Size([5, 5])
    """

    def __init__(self, in_channels: int = 1, filters: int = 64, n_way: int = 5, image_size: int = 28):
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16 (four 2x2 max-pools), got {image_size!r}")
        blocks, c, side = [], in_channels, image_size
        for _ in range(4):
            blocks += [nn.Conv2d(c, filters, 3, padding=1), nn.BatchNorm2d(filters), nn.ReLU(), nn.MaxPool2d(2)]
            c, side = filters, side // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(filters * side * side, n_way)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, C, H, W]
        return self.head(self.features(x).flatten(1))


class CaviaMLP(nn.Module):
    """An MLP whose input is concatenated with a context vector (CAVIA, Zintgraf et al. 2019).

    The context is an argument of ``forward``: CAVIA adapts only it, starting from zero for every
    task (``fastmaml.meta`` passes it with ``adapt="context"``).

    Args:
        in_features: input size.
        context_dim: size of the context vector.
        hidden: hidden sizes.
        out_features: output size.

    Example:
        >>> net = CaviaMLP(1, 4, (40, 40), 1)
        >>> net(torch.randn(10, 1), torch.zeros(4)).shape
        torch.Size([10, 1])
    """

    def __init__(self, in_features: int, context_dim: int, hidden: Sequence[int], out_features: int,
                 activation=nn.ReLU):
        super().__init__()
        self.context_dim = context_dim
        self.net = MLP(in_features + context_dim, hidden, out_features, activation)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:  # x: [N, in], context: [context_dim]
        return self.net(torch.cat([x, context.expand(x.shape[0], -1)], dim=1))


def mse_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error written with elementary ops.

    ``F.mse_loss`` fails under forward-over-reverse AD on torch 2.x (``jvp(grad(...))`` raises
    "ZeroTensors are immutable" because its target has no tangent); this one works in every mode.
    """
    return ((output - target) ** 2).mean()
