"""LightningModule for ATP all-in-one structural pruning (manual optimisation).

Every training step, on a batch `{"train": ..., "held_out": ...}`:
  1. generator step (control epochs only): on the held-out batch, LoRA frozen, one noisy draw
     of the generator; the cross-entropy is computed with the *soft* masks on the full layer
     outputs `((W + BA) x) * s` [paper], the ratio loss
     `alpha * |log(p / p_dense) - log(keep_target)|` (= alpha * log(max / min)) on the
     straight-through *hard* masks of the same draw [paper]; AdamW, gradient-norm clip 3.0
     [paper code]; learning rate: cosine from `generator_lr` to `generator_min_lr` over the
     control steps, and x `final_phase_factor` (0.2) in the last `final_phase` (1/3) of the last
     control epoch [paper code: cosine per epoch, 1/5 after 2/3 of the last control epoch;
     ours: the cosine is evaluated per step];
  2. LoRA step: on the training batch, a *fresh sampled* hard mask (no gradient) on the
     frozen path only, `(W x) * m + B A x` [paper code: a new sample after every generator
     step]; after the control epochs the frozen mask; CE loss;
  3. group-lasso proximal step on the LoRA rows of the masked structures (threshold
     eta x sqrt(rows per group)), eta growing linearly from 0 to `lasso_eta` over
     training, so they reach exactly zero.
When the control epochs end (or training ends inside them) the mask freezes: the last sample
[paper code], repaired to the parameter budget if it misses it by more than
`budget_tolerance` (atp/structural/allocation.py, [ours]). With `fixed_mask` (two-stage
baselines) there is no generator: LoRA steps and the group lasso run on that mask from the
start. `export(path)` merges LoRA, removes the masked structures and saves a smaller HF
checkpoint.

The search is visible: `generator/live_share` (share of groups whose soft mask still passes a
gradient, s(1 - s) / T > 1e-3) and `generator/keep_ratio` (the sampled hard mask) are logged
every generator step and kept in `search_log`; when the live share is near 0 the mask no
longer moves. One optimizer (two parameter groups) and one scheduler, so the module also
runs under DeepSpeed, which takes a single optimizer (see `structural_deepspeed_config`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from atp.structural.allocation import repair_to_budget
from atp.structural.export import remove_structures
from atp.structural.generator import DecisionGenerator, as_bool, live_gradient_share
from atp.structural.groups import StructureMask, decoder_parameters, family, layer_groups, mask_parameters
from atp.structural.masking import StructureMasker, decoder_layers, group_lasso_step, lora_b

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_target_names(model: nn.Module) -> list[str]:
    """Full names of the seven projections of every decoder layer (`LORA_TARGETS`), so that LoRA
    goes to the language model only: a VLM's vision tower also has q_proj / k_proj / v_proj
    (CLIP), which a suffix match would adapt too."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix + ".") and name.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(module, nn.Linear)
    ]


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The tensors of a batch (a LLaVA-format batch also carries answers and ids as lists)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def check_prune_ratio(prune_ratio: float) -> float:
    if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)) or not 0 < prune_ratio < 1:
        raise ValueError(
            f"prune_ratio must be in (0, 1): the fraction of decoder parameters to remove (0.4 = 40 %), "
            f"got {prune_ratio!r}."
        )
    return float(prune_ratio)


def generator_lr_factor(
    step: int, control_steps: int, last_epoch_steps: int, min_factor: float, final_phase: float, final_factor: float
) -> float:
    """Multiplier of `generator_lr` at generator step `step` (0-based) of `control_steps`:
    cosine from 1 to `min_factor`, times `final_factor` once `step` is in the last
    `final_phase` of the last control epoch (`last_epoch_steps` steps)."""
    if control_steps <= 0:
        return 1.0
    progress = min(step, control_steps) / control_steps
    factor = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if step >= control_steps - final_phase * last_epoch_steps:
        factor *= final_factor
    return factor


def flatten(mask: StructureMask) -> torch.Tensor:
    """[sum_l G_l + m_l] bool: per layer its attention groups, then its channels."""
    return torch.cat([torch.cat([a.bool(), c.bool()]) for a, c in zip(mask.attention, mask.channels)])


def unflatten(flat: torch.Tensor, groups) -> StructureMask:
    attention, channels, start = [], [], 0
    for g in groups:
        attention.append(flat[start : start + g.attention_groups].clone())
        start += g.attention_groups
        channels.append(flat[start : start + g.mlp_channels].clone())
        start += g.mlp_channels
    return StructureMask(attention, channels)


@contextmanager
def no_grad_for(parameters: list[nn.Parameter]):
    """Temporarily stop gradients to `parameters` (restored afterwards)."""
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)


class StructuralPruningModule(L.LightningModule):
    """model: an HF Llama / Mistral / Qwen2 causal LM, or a VLM whose language model is one
    (LLaVA, `model.model.language_model`): frozen; LoRA is added to the decoder layers here.
    Batches are the model's keyword inputs with labels (a VLM's include pixel_values)."""

    def __init__(
        self,
        model: nn.Module,
        prune_ratio: float = 0.4,
        control_epochs: int = 1,
        alpha: float = 5.0,
        generator_lr: float = 1e-4,
        generator_min_lr: float = 1e-6,
        final_phase: float = 1 / 3,
        final_phase_factor: float = 0.2,
        lora_lr: float = 1e-4,
        lora_rank: int = 32,
        lora_alpha: int = 64,
        lasso_eta: float = 1e-3,
        gradient_clip: float = 3.0,
        noise: str = "gumbel",
        budget_tolerance: float = 0.01,
        seed: int = 0,
        fixed_mask: StructureMask | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "fixed_mask"])
        self.prune_ratio = check_prune_ratio(prune_ratio)
        family(model.config)  # a clear error for a family without group definitions
        self.config = model.config
        targets = lora_target_names(model)
        lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0)
        self.model = get_peft_model(model, lora)
        self.groups = layer_groups(self.config)
        self.generator = DecisionGenerator(self.groups, noise=noise, seed=seed)
        self.masker = StructureMasker(self.model, self.config)
        self.dense_parameters = decoder_parameters(self.config)
        total = sum(g.attention_groups + g.mlp_channels for g in self.groups)
        self.register_buffer("lora_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("sample_flat", torch.ones(total, dtype=torch.bool))  # the last sampled hard mask
        self.register_buffer("has_sample", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen_flat", torch.ones(total, dtype=torch.bool))
        self.register_buffer("is_frozen", torch.zeros((), dtype=torch.bool))
        self.fixed_mask = fixed_mask
        self.search_log: list[dict] = []
        self.automatic_optimization = False

    # -- masks ----------------------------------------------------------------------------
    @property
    def budget(self) -> float:
        """Decoder parameters the final mask may keep."""
        return (1.0 - self.prune_ratio) * self.dense_parameters

    @torch.no_grad()
    def current_mask(self) -> StructureMask:
        """The mask in use: a two-stage baseline's fixed mask; else the frozen mask once the
        search is over; else the last sampled hard mask; before any step the deterministic one."""
        if self.fixed_mask is not None:
            return self.fixed_mask
        if bool(self.is_frozen):
            return unflatten(self.frozen_flat.cpu(), self.groups)
        if bool(self.has_sample):
            return unflatten(self.sample_flat.cpu(), self.groups)
        return as_bool(self.generator(noise=False).hard)

    @torch.no_grad()
    def freeze_mask(self) -> bool:
        """End the search: freeze the last sample, repaired to the budget [ours] if it misses it
        by more than `budget_tolerance`. Returns whether the repair changed it."""
        mask = self.current_mask()
        logits = self.generator.logits()
        frozen, repaired = repair_to_budget(mask, logits, self.config, self.budget, self.hparams.budget_tolerance)
        self.frozen_flat.copy_(flatten(frozen))
        self.is_frozen.fill_(True)
        return repaired

    def searching(self) -> bool:
        return self.fixed_mask is None and not bool(self.is_frozen) and self.current_epoch < self.hparams.control_epochs

    def keep_ratio(self, mask: StructureMask) -> torch.Tensor:
        """Fraction of the dense decoder parameters that `mask` keeps."""
        return mask_parameters(self.config, mask) / self.dense_parameters

    def eta(self) -> float:
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        return self.hparams.lasso_eta * min(1.0, float(self.lora_steps) / total)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if "lora_" in name]

    # -- training -------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self.fixed_mask is None and not bool(self.is_frozen) and self.current_epoch >= self.hparams.control_epochs:
            self.freeze_mask()

    def on_train_end(self) -> None:
        if self.fixed_mask is None and not bool(self.is_frozen):
            self.freeze_mask()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        if self.searching():
            self._generator_step(optimizer, batch["held_out"])
            with torch.no_grad():
                self.sample_flat.copy_(flatten(as_bool(self.generator(noise=True).hard)))
                self.has_sample.fill_(True)
        mask = self.current_mask()
        self.masker.set(mask, "frozen")
        loss = self.model(**model_inputs(batch["train"])).loss
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.lora_steps += 1
        group_lasso_step(self.model, self.config, mask, self.eta())
        self.log_dict(
            {"train/loss": loss.detach(), "train/keep_ratio": self.keep_ratio(mask).float(), "train/eta": self.eta()},
            prog_bar=True,
            batch_size=batch["train"]["input_ids"].shape[0],
        )
        return loss.detach()

    def _generator_step(self, optimizer, batch: dict) -> None:
        lr = float(optimizer.param_groups[0]["lr"])  # the generator's learning rate for this step
        with no_grad_for(self.lora_parameters()):
            sample = self.generator(noise=True)
            self.masker.set(sample.soft, "full")
            ce = self.model(**model_inputs(batch)).loss
            target = torch.tensor(1.0 - self.prune_ratio, dtype=torch.float64)
            kept = self.keep_ratio(sample.hard)
            regulariser = (kept.log() - target.log()).abs()
            loss = ce + self.hparams.alpha * regulariser.float()
            optimizer.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip, gradient_clip_algorithm="norm")
            optimizer.step()
        self.lr_schedulers().step()
        self.generator_steps += 1
        record = {
            "generator/ce": float(ce.detach()),
            "generator/ratio_loss": float(regulariser.detach()),
            "generator/keep_ratio": float(kept.detach()),
            "generator/live_share": live_gradient_share(sample.soft, self.generator.temperature),
            "generator/lr": lr,
        }
        self.search_log.append({"step": int(self.generator_steps), **record})
        self.log_dict(record)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.masker.set(self.current_mask(), "full")
        loss = self.model(**model_inputs(batch)).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("val/perplexity", torch.exp(loss), batch_size=batch["input_ids"].shape[0])

    def control_steps(self) -> tuple[int, int]:
        """(generator steps in the search, steps per epoch) from the trainer's data."""
        trainer = self._trainer
        if trainer is None:
            return 0, 0
        per_epoch = trainer.num_training_batches
        if not isinstance(per_epoch, int) or per_epoch <= 0:  # inf for an iterable without a length
            return 0, 0
        epochs = min(self.hparams.control_epochs, trainer.max_epochs if trainer.max_epochs not in (None, -1) else 10**9)
        return epochs * per_epoch, per_epoch

    def _generator_factor(self, step: int) -> float:
        control, per_epoch = self.control_steps()
        h = self.hparams
        return generator_lr_factor(
            step, control, per_epoch, h.generator_min_lr / h.generator_lr, h.final_phase, h.final_phase_factor
        )

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            [
                {"params": list(self.generator.parameters()), "lr": self.hparams.generator_lr},
                {"params": self.lora_parameters(), "lr": self.hparams.lora_lr},
            ]
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [self._generator_factor, lambda _: 1.0])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["generator_noise_rng"] = self.generator.noise_rng.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "generator_noise_rng" in checkpoint:
            self.generator.noise_rng.set_state(checkpoint["generator_noise_rng"])

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
