"""LightningModule for ATP all-in-one structural pruning (manual optimisation).

Every training step, on a batch `{"train": ..., "held_out": ...}`:
  1. generator step (control epochs only): on the held-out batch, LoRA frozen, a sampled
     straight-through mask on the full layer outputs `((W + BA) x) * m`; loss
     `CE + alpha * |log(p / p_dense) - log(keep_target)|` (= alpha * log(max / min)), p the
     decoder parameters the hard mask keeps; AdamW, gradient clip 1.0;
  2. LoRA step: on the training batch, the generator's deterministic hard mask on the
     frozen path only, `(W x) * m + B A x`; CE loss;
  3. group-lasso proximal step on the LoRA rows of the masked structures (threshold
     eta x sqrt(rows per group)), eta growing linearly from 0 to `lasso_eta` over
     training, so they reach exactly zero.
After `control_epochs` the generator stops (its deterministic mask is then fixed) and only
LoRA trains. With `fixed_mask` (two-stage baselines) there is no generator: LoRA steps and
the group lasso run on that mask from the start. `export(path)` merges LoRA, removes the
masked structures and saves a smaller HF checkpoint.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from atp.structural.export import remove_structures
from atp.structural.generator import DecisionGenerator
from atp.structural.groups import StructureMask, decoder_parameters, family, layer_groups, mask_parameters
from atp.structural.masking import StructureMasker, decoder_layers, group_lasso_step, lora_b

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_prune_ratio(prune_ratio: float) -> float:
    if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)) or not 0 < prune_ratio < 1:
        raise ValueError(
            f"prune_ratio must be in (0, 1): the fraction of decoder parameters to remove (0.4 = 40 %), "
            f"got {prune_ratio!r}."
        )
    return float(prune_ratio)


class StructuralPruningModule(L.LightningModule):
    """model: an HF Llama / Mistral / Qwen2 causal LM (frozen; LoRA is added here)."""

    def __init__(
        self,
        model: nn.Module,
        prune_ratio: float = 0.4,
        control_epochs: int = 1,
        alpha: float = 5.0,
        generator_lr: float = 1e-4,
        lora_lr: float = 1e-4,
        lora_rank: int = 32,
        lora_alpha: int = 64,
        lasso_eta: float = 1e-3,
        gradient_clip: float = 1.0,
        seed: int = 0,
        fixed_mask: StructureMask | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "fixed_mask"])
        self.prune_ratio = check_prune_ratio(prune_ratio)
        family(model.config)  # a clear error for a family without group definitions
        self.config = model.config
        lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
        self.model = get_peft_model(model, lora)
        self.generator = DecisionGenerator(layer_groups(self.config), seed=seed)
        self.masker = StructureMasker(self.model, self.config)
        self.dense_parameters = decoder_parameters(self.config)
        self.register_buffer("lora_steps", torch.zeros((), dtype=torch.long))
        self.fixed_mask = fixed_mask
        self.automatic_optimization = False

    # -- masks ----------------------------------------------------------------------------
    @torch.no_grad()
    def current_mask(self) -> StructureMask:
        """The generator's deterministic hard mask (fixed once the control epochs are over),
        or the fixed mask of a two-stage baseline."""
        if self.fixed_mask is not None:
            return self.fixed_mask
        mask = self.generator(noise=False)
        return StructureMask([m.detach().bool() for m in mask.attention], [m.detach().bool() for m in mask.channels])

    def keep_ratio(self, mask: StructureMask) -> torch.Tensor:
        """Fraction of the dense decoder parameters that `mask` keeps."""
        return mask_parameters(self.config, mask) / self.dense_parameters

    def eta(self) -> float:
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        return self.hparams.lasso_eta * min(1.0, float(self.lora_steps) / total)

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator_opt, lora_opt = self.optimizers()
        if self.fixed_mask is None and self.current_epoch < self.hparams.control_epochs:
            self._generator_step(generator_opt, batch["held_out"])
        mask = self.current_mask()
        self.masker.set(mask, "frozen")
        self.toggle_optimizer(lora_opt)
        loss = self.model(**batch["train"]).loss
        lora_opt.zero_grad()
        self.manual_backward(loss)
        lora_opt.step()
        self.untoggle_optimizer(lora_opt)
        self.lora_steps += 1
        group_lasso_step(self.model, self.config, mask, self.eta())
        self.log_dict(
            {"train/loss": loss.detach(), "train/keep_ratio": self.keep_ratio(mask).float(), "train/eta": self.eta()},
            prog_bar=True,
            batch_size=batch["train"]["input_ids"].shape[0],
        )
        return loss.detach()

    def _generator_step(self, optimizer, batch: dict) -> None:
        self.toggle_optimizer(optimizer)
        mask = self.generator(noise=True)
        self.masker.set(mask, "full")
        ce = self.model(**batch).loss
        target = torch.tensor(1.0 - self.prune_ratio, dtype=torch.float64)
        regulariser = (self.keep_ratio(mask).log() - target.log()).abs()
        loss = ce + self.hparams.alpha * regulariser.float()
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        self.untoggle_optimizer(optimizer)
        self.log_dict({"generator/ce": ce.detach(), "generator/ratio_loss": regulariser.detach().float()})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.masker.set(self.current_mask(), "full")
        loss = self.model(**batch).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("val/perplexity", torch.exp(loss), batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        lora = [p for name, p in self.model.named_parameters() if "lora_" in name]
        return [
            torch.optim.AdamW(self.generator.parameters(), lr=self.hparams.generator_lr),
            torch.optim.AdamW(lora, lr=self.hparams.lora_lr),
        ]

    # -- export -----------------------------------------------------------------------------
    def masked_lora_norm(self, mask: StructureMask | None = None) -> float:
        """Largest norm of a LoRA group (v_proj rows of a masked attention group, up_proj row
        of a masked channel) that export needs to be exactly zero."""
        mask = mask or self.current_mask()
        largest = 0.0
        for layer, groups, heads, channels in zip(
            decoder_layers(self.model), layer_groups(self.config), mask.attention, mask.channels
        ):
            v = lora_b(layer.self_attn.v_proj).view(len(heads), -1)[~heads]
            up = lora_b(layer.mlp.up_proj)[~channels]
            for rows in (v, up):
                if len(rows):
                    largest = max(largest, float(rows.norm(dim=1).max()))
        return largest

    @torch.no_grad()
    def export(self, path: str | Path) -> Path:
        """Merge LoRA, remove the masked structures, save a `from_pretrained` checkpoint to
        `path` atomically. Leaves this module's model merged (call once, at the end)."""
        mask = self.current_mask()
        remaining = self.masked_lora_norm(mask)
        if remaining != 0.0:
            raise ValueError(
                f"the LoRA rows of masked structures are not zero yet (largest norm {remaining:.3g}); train longer "
                "or raise lasso_eta so the group lasso removes them before export."
            )
        self.masker.remove()
        model = remove_structures(self.model.merge_and_unload(), mask)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        model.save_pretrained(staging)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
        return path


def reached_keep_ratio(module: StructuralPruningModule) -> float:
    """Decoder parameters kept by the module's current mask, as a fraction of the dense model."""
    return float(module.keep_ratio(module.current_mask()))
