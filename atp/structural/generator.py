"""ATP's pruning-decision generator: one structure mask for the whole model (input-independent).

Fixed orthonormal inputs [L, 64] -> 2-layer TransformerEncoder (d_model 64, 4 heads, ff 256)
-> LayerNorm -> per decoder layer a bias-free Linear(64 -> G_l + m_l) giving logits z for
its attention groups and MLP channels. Gumbel-sigmoid `m = sigmoid((z + g + 3) / T)`,
T = 0.4, g logistic noise (the +3 starts it near dense); the hard mask thresholds at 0.5
with a straight-through estimator (forward hard, backward soft). [ours] A layer always
keeps at least its highest-scoring attention group and MLP channel, so it stays a valid
layer after export.
"""

from __future__ import annotations

import torch
from torch import nn

from atp.structural.groups import LayerGroups, StructureMask


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
        seed: int = 0,
    ) -> None:
        super().__init__()
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

    def logits(self) -> list[torch.Tensor]:
        """Per layer, [G_l + m_l] logits z."""
        features = self.norm(self.encoder(self.inputs[None]))[0]  # [L, width]
        return [head(features[index]) for index, head in enumerate(self.heads)]

    def forward(self, noise: bool = True) -> StructureMask:
        """Straight-through hard masks (values 0/1, gradients of the soft Gumbel-sigmoid).

        noise=False gives the deterministic mask `z + 3 > 0` (plus each layer's top entries).
        """
        attention, channels = [], []
        for z, groups in zip(self.logits(), self.sizes):
            x = z + self.offset
            if noise:
                u = torch.rand_like(z).clamp(1e-6, 1 - 1e-6)
                x = x + torch.log(u) - torch.log1p(-u)
            soft = torch.sigmoid(x / self.temperature)
            attention.append(straight_through(soft[:groups]))
            channels.append(straight_through(soft[groups:]))
        return StructureMask(attention, channels)


def straight_through(soft: torch.Tensor) -> torch.Tensor:
    """[n] hard mask (soft > 0.5, at least the top entry kept) with the gradient of `soft`."""
    hard = soft > 0.5
    hard[soft.argmax()] = True
    hard = hard.to(soft.dtype)
    return hard + soft - soft.detach()
