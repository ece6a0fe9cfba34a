"""ATP's pruning-decision generator: one structure mask for the whole model (input-independent).

Fixed orthonormal inputs [L, 64] -> 2-layer TransformerEncoder (d_model 64, 4 heads, ff 256)
-> LayerNorm -> per decoder layer a bias-free Linear(64 -> G_l + m_l) giving logits z for
its attention groups and MLP channels [paper]. Soft mask `s = sigmoid((z + g + 3) / T)`,
T = 0.4, offset 3 (starts near dense) [paper]; g is noise:
  * "gumbel" (default): one standard Gumbel sample -log(-log u) per entry, as the official
    code adds it [paper];
  * "logistic": log u - log(1 - u) (the difference of two Gumbels, the usual binary-concrete
    noise) [ours, kept as an option].
The hard mask thresholds the soft one at 0.5 with a straight-through estimator (forward hard,
backward soft) [paper]. [ours] A layer always keeps at least its highest-scoring attention
group and MLP channel, so it stays a valid layer after export.

The noise comes from the generator's own `torch.Generator` (`noise_rng`), whose state the
Lightning module stores in its checkpoints, so a resumed run draws the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from atp.structural.groups import LayerGroups, StructureMask

NOISES = ("gumbel", "logistic")


@dataclass
class GeneratorSample:
    """One draw: the soft masks s in (0, 1) and the straight-through hard masks of the same draw."""

    soft: StructureMask
    hard: StructureMask


class DecisionGenerator(nn.Module):
    def __init__(
        self,
        groups: list[LayerGroups],
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        feedforward: int = 256,
        temperature: float = 0.4,
        offset: float = 3.0,
        noise: str = "gumbel",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if noise not in NOISES:
            raise ValueError(f"generator noise must be one of {NOISES}, got {noise!r}.")
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.empty(len(groups), width)
        inputs = nn.init.orthogonal_(inputs, generator=generator)
        self.register_buffer("inputs", inputs)  # [L, width]
        layer = nn.TransformerEncoderLayer(width, heads, feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleList(nn.Linear(width, g.attention_groups + g.mlp_channels, bias=False) for g in groups)
        self.sizes = [g.attention_groups for g in groups]
        self.temperature = float(temperature)
        self.offset = float(offset)
        self.noise = noise
        self.noise_rng = torch.Generator().manual_seed(seed + 1)  # CPU stream; its state travels in checkpoints

    def logits(self) -> list[torch.Tensor]:
        """Per layer, [G_l + m_l] logits z, in float32 even under mixed-precision autocast (bf16
        logits would quantise z + 3 to steps of 1/64 and move the 0.5 thresholds) [ours]."""
        with torch.autocast(self.inputs.device.type, enabled=False):
            features = self.norm(self.encoder(self.inputs[None]))[0]  # [L, width]
            return [head(features[index]) for index, head in enumerate(self.heads)]

    def draw_noise(self, shape: torch.Size) -> torch.Tensor:
        """[shape] noise g of the configured kind, from `noise_rng` (CPU)."""
        u = torch.rand(shape, generator=self.noise_rng).clamp(1e-6, 1 - 1e-6)
        if self.noise == "gumbel":
            return -torch.log(-torch.log(u))
        return torch.log(u) - torch.log1p(-u)

    def forward(self, noise: bool = True) -> GeneratorSample:
        """Soft masks and straight-through hard masks (values 0/1, gradients of the soft ones).

        noise=False gives the deterministic masks of `z + 3` (hard: `z + 3 > 0` plus each layer's top entries).
        """
        soft_attention, soft_channels, attention, channels = [], [], [], []
        for z, groups in zip(self.logits(), self.sizes):
            x = z + self.offset
            if noise:
                x = x + self.draw_noise(z.shape).to(device=z.device, dtype=z.dtype)
            soft = torch.sigmoid(x / self.temperature)
            soft_attention.append(soft[:groups])
            soft_channels.append(soft[groups:])
            attention.append(straight_through(soft[:groups]))
            channels.append(straight_through(soft[groups:]))
        return GeneratorSample(StructureMask(soft_attention, soft_channels), StructureMask(attention, channels))


def straight_through(soft: torch.Tensor) -> torch.Tensor:
    """[n] hard mask (soft > 0.5, at least the top entry kept) with the gradient of `soft`."""
    hard = soft > 0.5
    hard[soft.argmax()] = True
    hard = hard.to(soft.dtype)
    return hard + soft - soft.detach()


def live_gradient_share(soft: StructureMask, temperature: float, threshold: float = 1e-3) -> float:
    """Share of all groups (attention groups and MLP channels) whose soft mask still passes a
    gradient: ds/dz = s (1 - s) / T > threshold. Near 0 the search has stopped moving the mask."""
    values = torch.cat([m.detach().flatten() for m in (*soft.attention, *soft.channels)]).float()
    return float((values * (1 - values) / temperature > threshold).float().mean())


def as_bool(mask: StructureMask) -> StructureMask:
    """A detached boolean copy of a (straight-through or soft-thresholded hard) mask."""
    return StructureMask([m.detach() > 0.5 for m in mask.attention], [m.detach() > 0.5 for m in mask.channels])
