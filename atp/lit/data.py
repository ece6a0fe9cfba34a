"""LightningDataModule for LLaVA-format JSON plus an image folder (the testbed and LLaVA-665K)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, Subset

from atp.data.llava_format import LlavaConversationDataset, collate
from atp.data.shapes import write_dataset


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch) (Lightning calls `set_epoch`), and that can
    skip the part of an epoch a resumed run has already trained on."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples to skip in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, skip: int) -> None:
        self._resume = (epoch, skip)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1] :]
            self._resume = None
        return iter(order)

    def __len__(self) -> int:
        return self.size


class ResumableDataLoader(DataLoader):
    """A train loader Lightning checkpoints (it has state_dict/load_state_dict): it records the
    epoch and the batches already trained in it, so a run resumed mid-epoch continues with
    the next batch instead of replaying the epoch from its start.

    progress: returns the batches processed so far in the current epoch (Lightning's count).
    """

    def __init__(self, *args, progress: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": int(self.progress())}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)


class LlavaDataModule(L.LightningDataModule):
    """train_json / val_json: LLaVA-format files; image_folder: where their images live.

    The validation set is served prompt-only (up to the first answer) for answer scoring.
    processor: the model's HF processor (chat template, image preprocessing, tokenizer).
    """

    def __init__(
        self,
        processor,
        train_json: str,
        val_json: str,
        image_folder: str,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.processor = processor
        self.train_json, self.val_json, self.image_folder = train_json, val_json, image_folder
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_train_samples, self.max_val_samples = max_train_samples, max_val_samples
        self.seed = seed
        self._collate = functools.partial(collate, pad_token_id=processor.tokenizer.pad_token_id)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = LlavaConversationDataset(
            self.train_json, self.image_folder, self.processor, self.max_train_samples
        )
        self.val_set = LlavaConversationDataset(
            self.val_json, self.image_folder, self.processor, self.max_val_samples, prompt_only=True
        )

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffleSampler(len(self.train_set), self.seed)
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self._collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            progress=self._batches_this_epoch,
        )

    def _batches_this_epoch(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=self.eval_batch_size, collate_fn=self._collate, num_workers=self.num_workers
        )


def ensure_shapes_dataset(
    root: str,
    train_samples: int,
    val_samples: int,
    test_samples: int,
    pruner_train_samples: int = 0,
    questions_per_image: int = 5,
    seed: int = 0,
) -> Path:
    """Generate ShapesVQA under `root` unless it is already there with these sizes.

    train.json: multi-turn (`questions_per_image` questions per image) for the base model;
    train_single.json: one question per image, for training pruners; val/test: one question.
    """
    root_path = Path(root)
    key = f"{train_samples}-{val_samples}-{test_samples}-{pruner_train_samples}-{questions_per_image}-{seed}"
    marker = root_path / f".complete-{key}"
    if not marker.exists():
        splits = {
            "train": (train_samples, seed + 1, questions_per_image),
            "val": (val_samples, seed + 2, 1),
            "test": (test_samples, seed + 3, 1),
        }
        if pruner_train_samples:
            splits["train_single"] = (pruner_train_samples, seed + 4, 1)
        for stale in root_path.glob(".complete-*"):  # another size's files are about to be overwritten
            stale.unlink()
        write_dataset(root_path, splits)
        marker.touch()
    return root_path


def prepare_configured_data(data) -> None:
    """Generate the testbed when a data config names it (`kind: shapes`); other data must exist."""
    if data.kind == "shapes":
        ensure_shapes_dataset(
            data.root,
            data.train_samples,
            data.val_samples,
            data.test_samples,
            data.pruner_train_samples,
            data.questions_per_image,
        )


class StructuralLlavaDataModule(LlavaDataModule):
    """LLaVA-format data for ATP structural pruning of a VLM's language model
    (`StructuralPruningModule`): training yields `{"train": batch, "held_out": batch}`, the
    LoRA steps' and the generator's streams, two disjoint parts of `train_json` (the last
    `held_out_fraction` of its records, at least one, feed the generator [ours: the official
    code splits its instruction data the same way]); validation yields supervised batches
    (prompt and answer, with labels) of `val_json`, for a validation loss."""

    def __init__(
        self, processor, train_json: str, val_json: str, image_folder: str, held_out_fraction: float = 0.1, **kwargs
    ) -> None:
        if not 0 < held_out_fraction < 1:
            raise ValueError(
                f"held_out_fraction must be in (0, 1): the share of training records that feed the generator, "
                f"got {held_out_fraction!r}."
            )
        super().__init__(processor, train_json, val_json, image_folder, **kwargs)
        self.held_out_fraction = held_out_fraction

    def setup(self, stage: str | None = None) -> None:
        records = LlavaConversationDataset(self.train_json, self.image_folder, self.processor, self.max_train_samples)
        if len(records) < 2:
            raise ValueError(f"{self.train_json} holds {len(records)} record(s); the two streams need at least 2.")
        held_out = min(len(records) - 1, max(1, round(self.held_out_fraction * len(records))))
        self.train_set = Subset(records, range(len(records) - held_out))
        self.held_out_set = Subset(records, range(len(records) - held_out, len(records)))
        self.val_set = LlavaConversationDataset(self.val_json, self.image_folder, self.processor, self.max_val_samples)

    def train_dataloader(self) -> dict[str, DataLoader]:
        return {"train": self._stream(self.train_set, 0), "held_out": self._stream(self.held_out_set, 1)}

    def _stream(self, dataset, offset: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed * 2 + offset),
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )
