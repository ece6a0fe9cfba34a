"""The probe's keys of the layer about to run, reused inside that layer (inference only).

A pruner that scores with the attention of the layer it runs before (PyramidDrop: the last
instruction token's row of layer l, before layer l) makes the runtime project that layer's
keys for every current token (`probe.project_qk`: the layer's input norm, then k_proj); the
layer then projects the keys of the tokens it keeps a second time. With gradients off, the
runtime instead hands the layer's k_proj, for its next call only, the probe's keys of the
slots the layer receives (gathered as the hidden states were): the same rows of the same
projection of the same normed inputs, so the layer gets what it would have computed, once.
With gradients on (training) nothing is reused: the probe ran without them.
"""

from __future__ import annotations

import torch
from torch import nn


class KeyReuse:
    """One pending offer (the probe's keys of one layer) and at most one served k_proj."""

    def __init__(self) -> None:
        self._offer: tuple[int, torch.Tensor, torch.Tensor, float] | None = None  # (layer, hidden, keys, seconds)
        self._served: nn.Module | None = None

    def offer(self, layer: int, hidden: torch.Tensor, keys: torch.Tensor, seconds: float = 0.0) -> None:
        """The probe projected `keys` [B, S, H_kv * hd] of decoder layer `layer` from `hidden` [B, S, d]
        in `seconds` (wall)."""
        self._offer = None if torch.is_grad_enabled() else (layer, hidden, keys, seconds)

    def take(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """(keys, seconds) offered if they were projected for `layer` from exactly `hidden` (the same
        tensor), else None; the offer is withdrawn either way."""
        offer, self._offer = self._offer, None
        if offer is None or offer[0] != layer or offer[1] is not hidden or torch.is_grad_enabled():
            return None
        return offer[2], offer[3]

    def serve(self, k_proj: nn.Module, keys: torch.Tensor) -> None:
        """The next call of this `k_proj` instance returns `keys` [B, S', H_kv * hd] instead of projecting
        (when its input has their [B, S'] shape; otherwise it projects as usual). A per-instance, one-call
        override: the module's class is untouched and its hooks run on the returned keys."""
        self.restore()

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self.restore()
            if x.shape[:-1] != keys.shape[:-1] or args or kwargs:
                return k_proj.forward(x, *args, **kwargs)  # the class's forward again (restored above)
            return keys

        k_proj.forward = forward
        self._served = k_proj

    def restore(self) -> None:
        """Take a served override off (its call happened, or the forward ended without it)."""
        if self._served is not None:
            self._served.__dict__.pop("forward", None)
            self._served = None
