"""A user's own 1-D convolutional network, and the generator of the example's signal data.

The task: each signal is noise with one short pattern (one of four shapes) at a random position; the class is the
pattern's shape. A 1-D CNN with global pooling finds a pattern wherever it is; an MLP on the raw samples must learn
each position separately, so it does clearly worse.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
from torch import nn


class Net1D(nn.Module):
    """`depth` blocks of Conv1d (kernel 5, `channels` doubling per block) (+ BatchNorm1d) + ReLU + max-pool, then
    global max pooling, dropout and a linear layer. searchlab passes input_shape ([length] or [channels, length])
    and num_outputs."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, channels: int = 32, depth: int = 2,
                 dropout: float = 0.1, batch_norm: bool = True) -> None:
        super().__init__()
        in_channels = 1 if len(input_shape) == 1 else int(input_shape[0])
        layers: list[nn.Module] = []
        for block in range(depth):
            out = channels * 2**block
            layers.append(nn.Conv1d(in_channels, out, kernel_size=5, padding=2))
            if batch_norm:
                layers.append(nn.BatchNorm1d(out))
            layers += [nn.ReLU(), nn.MaxPool1d(2)]
            in_channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(in_channels, num_outputs))

    def forward(self, x):
        if x.dim() == 2:  # (N, L): one channel
            x = x.unsqueeze(1)
        return self.head(self.features(x))


def _pattern(kind: int, length: int) -> np.ndarray:
    t = np.arange(length)
    if kind == 0:
        return np.sin(2 * np.pi * t / 8)  # slow wave
    if kind == 1:
        return np.sin(2 * np.pi * t / 4)  # fast wave
    if kind == 2:
        return 1 - np.abs(2 * t / (length - 1) - 1) * 2  # triangle
    return np.where(t < length // 2, 1.0, -1.0)  # step up, then down


def make_signals(n: int = 3000, length: int = 128, pattern: int = 16, noise: float = 0.6,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n signals of `length` samples: Gaussian noise plus one pattern of `pattern` samples at a random place."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0.0, noise, (n, length))
    starts = rng.integers(0, length - pattern, n)
    for i in range(n):
        x[i, starts[i]:starts[i] + pattern] += rng.uniform(0.8, 1.2) * _pattern(int(y[i]), pattern)
    return x.astype(np.float32), y.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description="write the example's signals to an .npz for data=npz")
    parser.add_argument("path", nargs="?", default="signals.npz")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, y = make_signals(args.n, seed=args.seed)
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    np.savez(args.path, x_train=x[:a], y_train=y[:a], x_val=x[a:b], y_val=y[a:b], x_test=x[b:], y_test=y[b:])
    print(f"wrote {args.path}: {a} train, {b - a} val, {len(x) - b} test signals of length {x.shape[1]}")


if __name__ == "__main__":
    main()
