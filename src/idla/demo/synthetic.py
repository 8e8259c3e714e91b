"""Two benchmark workloads heavier than the digits CNN, generated in memory from a seed.

- `SmallResNet` on `pattern_images_split`: 32×32 RGB images of 10 classes, each a smooth random
  template of its class, shifted at random (circularly, up to ±`max_shift_px`) and buried in
  Gaussian noise. A model has to find a pattern anywhere in the image, so convolutions earn
  their keep and test accuracy means something.
- `TinyTransformerLM` on `markov_tokens_split`: token sequences from a seeded random Markov
  chain (each token has a few likely successors), so the loss falls from ln(vocab) towards the
  chain's entropy rate.

The ResNet normalizes with GroupNorm, not BatchNorm: it holds no buffers, so idla and plain DDP
train it alike with no question of how batch statistics are shared across ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

IMAGE_SIZE_PX = 32
IMAGE_CLASSES = 10


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pattern_images_split(train_samples: int = 4096, test_samples: int = 1024, seed: int = 0,
                         noise_std: float = 1.0, max_shift_px: int = 8,
                         ) -> tuple[TensorDataset, TensorDataset]:
    """(train, test): images (n, 3, 32, 32) float32 and labels (n,) int64, both from `seed`.

    Each class's template is unit-variance noise on an 8×8 grid, upsampled bilinearly (smooth,
    so a shifted copy still overlaps its original); a sample is its class's template rolled by
    a random offset plus `noise_std` Gaussian noise per pixel.
    """
    generator = _generator(seed)
    coarse = torch.randn(IMAGE_CLASSES, 3, 8, 8, generator=generator)
    templates = F.interpolate(coarse, size=IMAGE_SIZE_PX, mode="bilinear", align_corners=False)
    templates = templates / templates.std(dim=(1, 2, 3), keepdim=True)
    total = train_samples + test_samples
    labels = torch.randint(IMAGE_CLASSES, (total,), generator=generator)
    shifts = torch.randint(-max_shift_px, max_shift_px + 1, (2, total, 1), generator=generator)
    pixels = torch.arange(IMAGE_SIZE_PX)
    rows = ((pixels + shifts[0]) % IMAGE_SIZE_PX).view(total, 1, IMAGE_SIZE_PX, 1)
    cols = ((pixels + shifts[1]) % IMAGE_SIZE_PX).view(total, 1, 1, IMAGE_SIZE_PX)
    shape = (total, 3, IMAGE_SIZE_PX, IMAGE_SIZE_PX)
    images = templates[labels].gather(2, rows.expand(shape)).gather(3, cols.expand(shape))
    images = images + noise_std * torch.randn(shape, generator=generator)
    train = TensorDataset(images[:train_samples], labels[:train_samples])
    test = TensorDataset(images[train_samples:], labels[train_samples:])
    return train, test


class _BasicBlock(nn.Module):
    """Two 3×3 convolutions with GroupNorm and a residual connection (He et al. 2016)."""

    def __init__(self, in_channels: int, channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.GroupNorm(groups, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A stride-2 stem, then one basic block per stage at widths `widths` (each stage after the
    first halves the resolution), global average pooling and a linear classifier."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = IMAGE_CLASSES,
                 groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, padding=1, bias=False),
                                  nn.GroupNorm(groups, widths[0]), nn.ReLU())
        blocks = []
        for stage, channels in enumerate(widths):
            in_channels = widths[max(stage - 1, 0)]
            blocks.append(_BasicBlock(in_channels, channels, 1 if stage == 0 else 2, groups))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 3, 32, 32)
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def markov_tokens_split(train_samples: int = 4096, test_samples: int = 512, seq_len: int = 64,
                        vocab: int = 256, successors: int = 8, seed: int = 0,
                        ) -> tuple[TensorDataset, TensorDataset]:
    """(train, test): inputs (n, seq_len) int64 and next-token targets (n, seq_len) int64.

    A first-order Markov chain: each token's `successors` likely next tokens are drawn at
    random and weighted by squared exponential draws (skewed); sequences start at a uniform token.
    """
    generator = _generator(seed)
    total = train_samples + test_samples
    next_tokens = torch.stack([torch.randperm(vocab, generator=generator)[:successors]
                               for _ in range(vocab)])  # (vocab, successors)
    # Squared exponential draws: a few dominant successors per token, like a Dirichlet(0.5).
    weights = torch.rand(vocab, successors, generator=generator).log().square()
    weights = weights / weights.sum(dim=1, keepdim=True)
    tokens = torch.empty(total, seq_len + 1, dtype=torch.int64)
    tokens[:, 0] = torch.randint(vocab, (total,), generator=generator)
    for position in range(seq_len):
        rows = weights[tokens[:, position]]
        picks = torch.multinomial(rows, 1, generator=generator).squeeze(1)
        tokens[:, position + 1] = next_tokens[tokens[:, position], picks]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return (TensorDataset(inputs[:train_samples], targets[:train_samples]),
            TensorDataset(inputs[train_samples:], targets[train_samples:]))


class TinyTransformerLM(nn.Module):
    """A causal pre-norm Transformer language model: token and learned position embeddings,
    `layers` encoder layers (GELU, feed-forward 4·d_model), a final LayerNorm and an output
    projection tied to the token embedding."""

    def __init__(self, vocab: int = 256, d_model: int = 128, heads: int = 4, layers: int = 2,
                 max_seq_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.zeros(max_seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        # Unit-norm token vectors: the tied output starts within ~0.5 nat of uniform and learns
        # several times faster in a short run than GPT-2's std 0.02.
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(d_model))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (batch, seq) int64
        seq_len = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(seq_len, device=tokens.device)
        hidden = self.embed(tokens) + self.position[:seq_len]
        hidden = self.norm(self.encoder(hidden, mask=mask, is_causal=True))
        return hidden @ self.embed.weight.T  # (batch, seq, vocab) logits


def token_cross_entropy(model: nn.Module, tokens: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every token of the batch.

    Every sample has the same number of tokens, so this per-token mean is also the mean over
    samples of each sample's mean: the per-sample mean loss idla's `agent.backward` expects.
    """
    logits = model(tokens)  # (batch, seq, vocab)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def mean_token_loss(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    """`token_cross_entropy` over all of `data` (nats per token)."""
    tokens, targets = (t.to(device) for t in data.tensors)
    model.eval()
    loss = token_cross_entropy(model, tokens, targets)
    model.train()
    return float(loss)
