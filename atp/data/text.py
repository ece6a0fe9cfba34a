"""A domain text corpus for structural pruning: Python's own documentation topics
(`pydoc_data.topics`, shipped with every Python), split by topic into train / validation /
test, tokenised and cut into fixed-length chunks.

The training topics are split once more: most feed the LoRA steps, a held-out part feeds
ATP's generator steps (its "held-out batch stream").
"""

from __future__ import annotations

import random

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

SPLITS = ("train", "held_out", "val", "test")


def topic_splits(seed: int = 0, fractions: tuple[float, ...] = (0.72, 0.08, 0.1, 0.1)) -> dict[str, list[str]]:
    """{split: [topic text]}: the pydoc topics shuffled (seeded) and split by topic, never within one."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    bounds = [round(sum(fractions[:i]) * len(names)) for i in range(len(fractions) + 1)]
    return {split: [topics[n] for n in names[bounds[i] : bounds[i + 1]]] for i, split in enumerate(SPLITS)}


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained on `texts` (offline, seconds), as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def token_chunks(texts: list[str], tokenizer, length: int, max_chunks: int | None = None) -> torch.Tensor:
    """[N, length] token ids: the texts joined with EOS and cut into consecutive chunks."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    count = len(ids) // length
    if max_chunks is not None:
        count = min(count, max_chunks)
    if count == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one chunk of {length}; use a shorter seq_len.")
    return torch.tensor(ids[: count * length]).view(count, length)


def as_lm_batch(rows: list[tuple[torch.Tensor]]) -> dict:
    ids = torch.stack([row[0] for row in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class TextDataModule(L.LightningDataModule):
    """Training yields `{"train": batch, "held_out": batch}` (LoRA and generator steps);
    validation and test yield plain causal-LM batches."""

    def __init__(
        self,
        tokenizer,
        seq_len: int = 128,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        max_train_chunks: int | None = None,
        max_eval_chunks: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size, self.eval_batch_size = seq_len, batch_size, eval_batch_size
        self.max_train_chunks, self.max_eval_chunks = max_train_chunks, max_eval_chunks
        self.seed = seed
        self.chunks: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.chunks:
            return
        for split, texts in topic_splits(self.seed).items():
            limit = self.max_train_chunks if split in ("train", "held_out") else self.max_eval_chunks
            self.chunks[split] = token_chunks(texts, self.tokenizer, self.seq_len, limit)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        dataset = TensorDataset(self.chunks[split])
        return DataLoader(dataset, batch_size, shuffle=shuffle, generator=generator, collate_fn=as_lm_batch)

    def train_dataloader(self) -> dict[str, DataLoader]:
        return {
            "train": self._loader("train", True, self.batch_size),
            "held_out": self._loader("held_out", True, self.batch_size),
        }

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
