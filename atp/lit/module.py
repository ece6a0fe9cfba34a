"""LightningModule for VLM training with or without a token pruner.

`shapes_base` trains a whole tiny LLaVA (no pruner). ATP training freezes the vision tower,
projector and LLM and trains the ATP modules through soft masks (runtime mask mode); it
validates with hard pruning in drop mode, as at inference. Optional LoRA on the LLM (peft).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

import atp
from atp.models import get_adapter
from atp.models.adapter import MODEL_INPUT_KEYS
from atp.token.atp import ATPPruner, atp_losses

TRAIN_PARTS = ("all", "language_model", "projector_and_language_model", "pruner", "lora")
FULL_CHECKPOINT_PARTS = ("all", "language_model", "projector_and_language_model")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class VLMTrainingModule(L.LightningModule):
    """model: an HF LLaVA; pruner: a TokenPruner or None.

    train_parts: "all"; "language_model" (vision tower and projector frozen, as in LLaVA:
    a vision side trained from scratch together with the LLM collapses to image-independent
    features before the LLM learns to read them); "projector_and_language_model" (LLaVA-1.5's
    stage 2: only the vision tower frozen); "pruner" (only the pruner); "lora".

    target_tokens: ATP's N_target as a fraction of the visual tokens (<= 1) or an absolute
    count (> 1, e.g. 144 of 576); target_reduction: "batch" or "instance", target_side: "both"
    or "above" (see `atp_losses`); target_warmup: the fraction of the training steps over which
    the target falls linearly from every visual token to target_tokens (0: in force from the
    first step) [ours].

    pruner_betas: AdamW's betas for the pruner's parameters [ours]. With the default beta2 =
    0.999 the second moment remembers the large early gradients of the thresholds for about
    1,000 steps, so a threshold pushed where its gradient is small then moves far slower than
    pruner_lr; a smaller beta2 (e.g. 0.95) forgets them within about 20 steps.

    budget_offset_lr: the learning rate of ATP's per-module threshold offsets (pruner option
    budget_gradients="offset"; None: pruner_lr). Adam moves a parameter about its learning
    rate per step, so at the testbed's pruner_lr (3e-3) an offset would need 1,000 steps or more
    to move the threshold logits from their start (-3) to a budget of 25 % (a change of 3 to 5).

    hard_finetune: the fraction of the training steps, at the end, in which the pruner is
    frozen and the trainable LLM parts (LoRA) train on the pruner's hard drops, in `eval_mode`
    as at inference [ours]. Soft masks train the LLM on tokens weighted between 0 and 1, which
    inference then drops or keeps whole (docs/results.md, section 2); this phase
    adapts the LLM to the hard decisions its frozen thresholds make (on the testbed: +2.6, -1.8
    and -1.6 points in three seeds, docs/results.md, section 1). The learning-rate schedule
    restarts for it: warm-up and cosine over the soft phase as without it, then a cosine from
    the full rate over the hard phase. With DDP set `strategy.find_unused_parameters=true`: the
    frozen pruner gets no gradient in that phase.
    """

    def __init__(
        self,
        model: nn.Module,
        pruner: atp.TokenPruner | None = None,
        train_parts: str = "all",
        lr: float = 1e-3,
        pruner_lr: float = 1e-4,
        pruner_betas: tuple[float, float] = (0.9, 0.999),
        budget_offset_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        lambda_atp: float = 0.05,
        lambda_target: float = 0.2,
        target_tokens: float = 0.25,
        target_reduction: str = "batch",
        target_side: str = "both",
        target_warmup: float = 0.0,
        hard_finetune: float = 0.0,
        train_mode: str = "mask",
        eval_mode: str = "drop",
        lora_rank: int = 16,
        lora_alpha: int = 32,
    ) -> None:
        super().__init__()
        if train_parts not in TRAIN_PARTS:
            raise ValueError(f"train_parts must be one of {TRAIN_PARTS}, got {train_parts!r}.")
        self.save_hyperparameters(ignore=["model", "pruner"])
        self.model = model
        self.pruner = pruner
        self._check_target(target_tokens)
        if len(pruner_betas) != 2 or not all(0 <= beta < 1 for beta in pruner_betas):
            raise ValueError(f"pruner_betas={list(pruner_betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95].")
        if budget_offset_lr is not None and not budget_offset_lr > 0:
            raise ValueError(f"budget_offset_lr={budget_offset_lr} must be positive (or null: pruner_lr).")
        if not 0 <= target_warmup < 1:
            raise ValueError(f"target_warmup={target_warmup} is outside [0, 1): give a fraction of the training steps.")
        if not 0 <= hard_finetune < 1:
            raise ValueError(f"hard_finetune={hard_finetune} is outside [0, 1): give a fraction of the training steps.")
        if hard_finetune > 0 and (pruner is None or train_parts == "pruner"):
            raise ValueError(
                f"hard_finetune={hard_finetune} trains the LLM on a frozen pruner's hard drops, but "
                f"{'there is no pruner' if pruner is None else 'train_parts=pruner trains nothing else'}: "
                "use train_parts=lora with a pruner, or hard_finetune=0."
            )
        if train_parts == "lora":
            self._inject_lora(lora_rank, lora_alpha)
        adapter = get_adapter(self.model)
        projector = {id(p) for p in adapter.projector.parameters()}
        vision = {id(p) for p in adapter.vision_tower.parameters()} - projector  # Qwen: the merger sits in the tower
        for name, param in self.model.named_parameters():
            param.requires_grad_(
                train_parts == "all"
                or (train_parts == "language_model" and id(param) not in vision | projector)
                or (train_parts == "projector_and_language_model" and id(param) not in vision)
                or (train_parts == "lora" and "lora_" in name)
            )
        self.strict_loading = train_parts in FULL_CHECKPOINT_PARTS  # frozen-model runs save trainables only
        self._mode: str | None = None

    # -- set-up ---------------------------------------------------------------------------
    def _check_target(self, target: float) -> None:
        if self.pruner is None:
            return
        if not isinstance(self.pruner, ATPPruner):
            return
        visual = self._fixed_visual_tokens()
        if visual is None:
            if not 0 < target <= 1:
                raise ValueError(
                    f"target_tokens={target}: {type(self.model).__name__} gives each image its own number of "
                    "visual tokens, so give the target as a fraction of them in (0, 1] (e.g. 0.25)."
                )
            return
        if not 0 < target <= visual:
            raise ValueError(
                f"target_tokens={target} is outside (0, {visual}]: give a fraction of the {visual} visual tokens "
                "(e.g. 0.25) or a count no larger than that."
            )

    def _fixed_visual_tokens(self) -> int | None:
        """Visual tokens per image where every image has the same count (one fixed grid: LLaVA-1.5),
        else None (LLaVA-NeXT's crops, Qwen-VL's and InternVL's own counts); not the config's
        `image_seq_length`, which LLaVA-NeXT sets to 576 whatever the image."""
        grid = get_adapter(self.model).fixed_grid
        return None if grid is None else grid[0] * grid[1]

    def scheduled_target(self) -> float:
        """target_tokens at this training step, in its own units (a fraction or a count)."""
        final = self.hparams.target_tokens
        if self.hparams.target_warmup <= 0:
            return final
        start = 1.0 if final <= 1 else float(self._fixed_visual_tokens())
        warmup_steps = self.hparams.target_warmup * self.trainer.estimated_stepping_batches
        return start + min(1.0, self.global_step / max(warmup_steps, 1.0)) * (final - start)

    def phase_steps(self) -> tuple[int, int]:
        """(soft, hard): the steps trained through the training masks, then the hard_finetune steps."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        hard = round(self.hparams.hard_finetune * total)
        return total - hard, hard

    def in_hard_phase(self) -> bool:
        return self.hparams.hard_finetune > 0 and self.global_step >= self.phase_steps()[0]

    def _inject_lora(self, rank: int, alpha: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
        inject_adapter_in_model(config, self.model)

    def merged_model(self) -> nn.Module:
        """The model with LoRA (if any) merged into its weights: a stock HF model again."""
        from peft.tuners.lora import LoraLayer

        for name, layer in list(self.model.named_modules()):
            if isinstance(layer, LoraLayer):
                layer.merge()
                parent, child = name.rsplit(".", 1)
                setattr(self.model.get_submodule(parent), child, layer.get_base_layer())
        return self.model

    def use_mode(self, mode: str) -> None:
        """Attach the pruner in `mode` ("drop" or "mask"), if not attached that way already."""
        if self.pruner is not None and self._mode != mode:
            atp.apply(self.model, self.pruner, mode=mode)
            self._mode = mode

    def on_fit_start(self) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        if self.hparams.hard_finetune > 0 and isinstance(strategy, DDPStrategy):
            if not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False):
                raise ValueError(
                    f"hard_finetune={self.hparams.hard_finetune} freezes the pruner, which DDP then finds without "
                    "a gradient: set strategy.find_unused_parameters=true."
                )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # every batch (a no-op when already attached so): validation may run mid-epoch
        hard = self.in_hard_phase()
        if hard:
            self.pruner.requires_grad_(False)
        self.use_mode(self.hparams.eval_mode if hard else self.hparams.train_mode)

    def on_validation_epoch_start(self) -> None:
        self.use_mode(self.hparams.eval_mode)

    # -- steps ----------------------------------------------------------------------------
    def forward(self, batch: dict, **kwargs):
        inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
        return self.model(**inputs, **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch, labels=batch["labels"])
        loss = out.loss
        size = batch["input_ids"].shape[0]
        self.log("train/loss_lm", out.loss, prog_bar=True, batch_size=size)
        if isinstance(self.pruner, ATPPruner):
            stats = atp.stats(self.model)
            num_visual = stats.num_visual.to(loss.device)
            target = self.scheduled_target()
            target = (
                target * num_visual.float() if target <= 1 else torch.full_like(num_visual, target, dtype=torch.float)
            )
            terms = atp_losses(
                self.pruner,
                num_visual,
                target,
                self.hparams.lambda_atp,
                self.hparams.lambda_target,
                self.hparams.target_reduction,
                self.hparams.target_side,
            )
            loss = loss + terms["atp"] + terms["target"]
            self.log_dict(
                {
                    "train/loss_atp": terms["atp"],
                    "train/loss_target": terms["target"],
                    "train/avg_visual_tokens": terms["average_tokens"].mean(),
                },
                prog_bar=True,
                batch_size=size,
            )
        self.log("train/loss", loss, batch_size=size)
        if self.hparams.hard_finetune > 0:
            self.log("train/hard_phase", float(self.in_hard_phase()), batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """First-token accuracy of the answer (one-word answers) and tokens per layer."""
        logits = self(batch, logits_to_keep=1).logits[:, -1]
        tokenizer_ids = self._answer_token_ids(batch["answer"]).to(logits.device)
        accuracy = (logits.argmax(-1) == tokenizer_ids).float().mean()
        size = len(batch["answer"])
        self.log("val/accuracy", accuracy, prog_bar=True, batch_size=size, sync_dist=True)
        if self.pruner is not None:
            stats = atp.stats(self.model)
            self.log(
                "val/avg_visual_tokens", stats.average_visual_tokens().mean().float(), batch_size=size, sync_dist=True
            )

    def _answer_token_ids(self, answers: list[str]) -> torch.Tensor:
        tokenizer = self.trainer.datamodule.processor.tokenizer
        return torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers])

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        model_params = [p for p in self.model.parameters() if p.requires_grad]
        groups = []
        if model_params:
            groups.append({"params": model_params, "lr": self.hparams.lr})
        if self.pruner is not None and any(p.requires_grad for p in self.pruner.parameters()):
            betas = tuple(float(b) for b in self.hparams.pruner_betas)
            offsets = {name: p for name, p in self.pruner.named_parameters() if name.endswith("budget_offset")}
            rest = [p for name, p in self.pruner.named_parameters() if name not in offsets]
            groups.append({"params": rest, "lr": self.hparams.pruner_lr, "betas": betas})
            if offsets:
                offset_lr = self.hparams.budget_offset_lr or self.hparams.pruner_lr
                groups.append({"params": list(offsets.values()), "lr": offset_lr, "betas": betas})
        if not groups:
            raise ValueError("nothing to train: no trainable model parameters and no pruner parameters.")
        optimizer = torch.optim.AdamW(groups, weight_decay=self.hparams.weight_decay)
        soft, hard = self.phase_steps()
        warmup = int(self.hparams.warmup_ratio * soft)

        def cosine(progress: float) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        def schedule(step: int) -> float:  # linear warm-up, cosine decay to 0; the hard phase restarts the cosine
            if hard and step >= soft:
                return cosine((step - soft) / hard)
            if step < warmup:
                return (step + 1) / warmup
            return cosine((step - warmup) / max(1, soft - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Frozen-model runs keep only what trains (pruner, LoRA): small checkpoints."""
        if self.hparams.train_parts in FULL_CHECKPOINT_PARTS:
            return
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        pruner_keys = {f"pruner.{k}" for k in (self.pruner.state_dict() if self.pruner is not None else {})}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable | pruner_keys}
