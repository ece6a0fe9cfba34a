"""Structure masks on a (possibly peft-LoRA-wrapped) Llama-style decoder, and the
group-lasso proximal step that makes the masked structures removable.

A masked attention group is silenced at the output of v_proj (its heads then attend to
zero values), a masked MLP channel at the output of up_proj (silu(gate) * 0 = 0); what
q/k/gate compute for them no longer matters, so export may remove them all.

Two masking modes (ATP's alternating steps):
  * "full":   y = ((W + B A) x) * m   (generator steps; a dense model without LoRA)
  * "frozen": y = (W x) * m + B A x  (LoRA steps: the LoRA-aware forward; only the frozen
              path is masked, so LoRA keeps learning on masked rows until the group
              lasso drives them to exactly zero)
"""

from __future__ import annotations

import torch
from torch import nn

from atp.structural.groups import StructureMask, layer_groups

MODES = ("full", "frozen")


def decoder_stack(model: nn.Module) -> nn.Module:
    """The decoder (embed_tokens, layers, norm) of a causal LM, under a peft wrapper or not, or
    of a VLM, whose language model sits at `model.language_model` (LLaVA, Qwen-VL)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    language_model = getattr(base.model, "language_model", None)
    return base.model if language_model is None else language_model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM or of a VLM's language model (see `decoder_stack`)."""
    return decoder_stack(model).layers


class StructureMasker:
    """Per-instance forward hooks that multiply v_proj / up_proj outputs by the current mask."""

    def __init__(self, model: nn.Module, config) -> None:
        self.groups = layer_groups(config)
        self.mask: StructureMask | None = None
        self.mode = "full"
        self._handles = []
        for index, layer in enumerate(decoder_layers(model)):
            for name, module in (("v", layer.self_attn.v_proj), ("up", layer.mlp.up_proj)):
                base = getattr(module, "base_layer", None)
                self._handles.append(module.register_forward_hook(self._hook(index, name, "full")))
                if base is not None:
                    self._handles.append(base.register_forward_hook(self._hook(index, name, "frozen")))

    def set(self, mask: StructureMask | None, mode: str = "full") -> None:
        """Mask with `mask` (None: dense) in `mode` ("full" or "frozen") from the next forward on."""
        if mode not in MODES:
            raise ValueError(f"masking mode must be one of {MODES}, got {mode!r}.")
        self.mask, self.mode = mask, mode

    def _hook(self, index: int, name: str, mode: str):
        groups = self.groups[index]

        def scale(_module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
            if self.mask is None or self.mode != mode:
                return None
            if name == "v":
                factor = self.mask.attention[index].repeat_interleave(groups.head_dim)
            else:
                factor = self.mask.channels[index]
            return output * factor.to(output.dtype)

        return scale

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def lora_b(module: nn.Module) -> torch.Tensor:
    """The (only) LoRA B weight [out, r] of a peft LoRA linear layer."""
    adapters = list(module.lora_B.keys())
    if len(adapters) != 1:
        raise ValueError(f"expected one LoRA adapter on {type(module).__name__}, found {adapters}.")
    return module.lora_B[adapters[0]].weight


@torch.no_grad()
def group_lasso_step(model: nn.Module, config, mask: StructureMask, eta: float) -> None:
    """Proximal step of the group lasso on the LoRA groups of the masked structures:
    w_g <- w_g / ||w_g|| * max(0, ||w_g|| - eta * sqrt(rows_g)), where w_g are the rows of B
    (v_proj: the head_dim rows of one attention group; up_proj: one channel's row) that write
    the masked output; sqrt(rows_g) is the usual group-size weight of the group lasso. Rows of
    kept structures are untouched."""
    for layer, groups, heads, channels in zip(
        decoder_layers(model), layer_groups(config), mask.attention, mask.channels
    ):
        for weight, kept, rows in (
            (lora_b(layer.self_attn.v_proj), heads, groups.head_dim),
            (lora_b(layer.mlp.up_proj), channels, 1),
        ):
            blocks = weight.view(len(kept), rows * weight.shape[1])  # one row per group
            norms = blocks.norm(dim=1, keepdim=True)
            shrink = (norms - eta * rows**0.5).clamp_min(0) / norms.clamp_min(1e-12)
            blocks.mul_(torch.where(kept[:, None].bool(), torch.ones_like(shrink), shrink))
