"""ATP's one-stage structural search (generator + LoRA + group lasso) on the testbed VLM's language
model, fed by the testbed's image prompts (StructuralLlavaDataModule); the export loads back with
`from_pretrained`, equals the masked model, and runs in the token-pruning runtime with fastv and
atp (drop equals mask, generate exact, per-layer widths in the accounting)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

import atp
from atp.data.llava_format import prompt_loader
from atp.data.processor import build_processor
from atp.data.shapes import vocabulary
from atp.lit.data import StructuralLlavaDataModule, ensure_shapes_dataset
from atp.lit.structural import StructuralPruningModule
from atp.metrics import DecoderShape, cost_report, decoder_layer_macs
from atp.structural import decoder_parameters

LAYERS = "LlavaForConditionalGeneration.model.language_model.layers"


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """(module after the search, the export loaded back, the masked reference logits, a prompt batch)."""
    from tests.conftest import tiny_testbed_model

    root = tmp_path_factory.mktemp("joint_search")
    processor = build_processor(vocabulary(), image_size=56, patch_size=14)  # 4 x 4 = 16 visual tokens
    torch.manual_seed(0)
    model = tiny_testbed_model(processor, num_kv_heads=2)  # 2 attention groups per layer
    towers = {k: v.clone() for k, v in model.state_dict().items() if "language_model" not in k and "lm_head" not in k}
    data = ensure_shapes_dataset(str(root / "data"), train_samples=16, val_samples=4, test_samples=4)
    datamodule = StructuralLlavaDataModule(
        processor, str(data / "train.json"), str(data / "val.json"), str(data / "images"), batch_size=4,
        held_out_fraction=0.25,
    )  # fmt: skip
    module = StructuralPruningModule(
        model, prune_ratio=0.4, control_epochs=2, generator_lr=0.05, lora_lr=1e-3, lora_rank=4, lasso_eta=0.2
    )
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    batch = next(iter(prompt_loader(data / "test.json", data / "images", processor, 4, 4)))
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    mask = module.current_mask()
    module.masker.set(mask, "full")
    with torch.no_grad():
        masked = module.model(**batch).logits
    lora_names = [name for name, _ in module.model.named_parameters() if "lora_" in name]
    assert module.masked_lora_norm(mask) == 0.0  # the group lasso zeroed the masked structures' LoRA rows
    export = module.export(root / "export")
    processor.save_pretrained(export)
    loaded = LlavaForConditionalGeneration.from_pretrained(export).eval()
    return module, mask, lora_names, towers, loaded, masked, batch, processor


def test_the_search_ran_on_image_prompts_and_met_the_budget(searched):
    module, mask, lora_names, *_ = searched
    assert int(module.generator_steps) == 2 * 3 and int(module.lora_steps) == 3 * 3  # 12 of 16 records, batch 4
    assert bool(module.is_frozen)
    assert abs(float(module.keep_ratio(mask)) / 0.6 - 1) <= 0.01
    assert lora_names and all(".language_model.layers." in name for name in lora_names)  # no LoRA on the towers


def test_the_export_loads_back_and_equals_the_masked_model(searched):
    module, mask, _, towers, loaded, masked, batch, _ = searched
    text = loaded.config.text_config
    assert text.model_type.startswith("atp_pruned_")
    assert text.kv_heads_per_layer == [int(h.sum()) for h in mask.attention]
    assert text.intermediate_size_per_layer == [int(c.sum()) for c in mask.channels]
    assert len(set(zip(text.kv_heads_per_layer, text.intermediate_size_per_layer))) > 1  # per-layer widths differ
    kept = sum(p.numel() for p in loaded.model.language_model.layers.parameters())
    assert kept == decoder_parameters(module.config, mask)
    state = loaded.state_dict()
    for name, value in towers.items():  # the vision tower and projector are the original ones
        assert torch.equal(state[name], value), name
    with torch.no_grad():
        assert_close(loaded(**batch).logits, masked, rtol=1e-4, atol=1e-5)


def token_pruner(method: str):
    torch.manual_seed(0)
    if method == "fastv":
        return atp.build_pruner("fastv", layer=2, keep_ratio=0.5)
    pruner = atp.build_pruner("atp", num_layers=4)
    with torch.no_grad():  # thresholds inside the score range, so that the modules prune
        for module in pruner.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.0)
            module.spatial_head.bias.fill_(0.6)
    return pruner.eval()


@pytest.mark.parametrize("method", ["fastv", "atp"])
def test_token_pruning_on_the_searched_llm_drop_equals_mask_and_generate_is_exact(searched, method):
    *_, loaded, _, batch, processor = searched
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    loaded.set_attn_implementation("sdpa")
    pruner = token_pruner(method)
    logits, stats, generated = {}, {}, {}
    for mode in ("drop", "mask"):
        atp.apply(loaded, pruner, mode=mode)
        with torch.no_grad():
            logits[mode] = loaded(**batch).logits
        stats[mode] = atp.stats(loaded)
        generated[mode] = loaded.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        atp.remove(loaded)
    assert torch.equal(stats["drop"].visual_tokens, stats["mask"].visual_tokens)
    assert int(stats["drop"].visual_tokens[:, -1].max()) < 16  # the token pruner really pruned
    last = max(stats["drop"].kept)
    keep = batch["attention_mask"].bool() & (batch["input_ids"] != image)
    for b in range(len(keep)):
        visual = (batch["input_ids"][b] == image).nonzero()[:, 0]
        keep[b, visual[stats["drop"].kept[last][b]]] = True
    assert_close(logits["drop"][keep], logits["mask"][keep], rtol=1e-4, atol=1e-5)
    assert torch.equal(generated["drop"], generated["mask"])


def test_the_accounting_counts_the_searched_per_layer_widths(searched):
    """cost_report's FLOPs equal torch's FlopCounterMode, layer by layer, on one unpadded prompt."""
    *_, loaded, _, batch, _ = searched
    real = batch["attention_mask"][0].bool()
    sample = {"input_ids": batch["input_ids"][:1, real], "attention_mask": batch["attention_mask"][:1, real]}
    sample["pixel_values"] = batch["pixel_values"][:1]
    loaded.set_attn_implementation("eager")  # FlopCounterMode does not count CPU sdpa's attention products
    pruner = atp.build_pruner("random", layers=[1, 3], keep_ratio=[0.5, 0.25])  # no scoring products of its own
    atp.apply(loaded, pruner, mode="drop")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loaded(**sample)
    stats = atp.stats(loaded)
    atp.remove(loaded)
    counts = counter.get_flop_counts()
    text = loaded.config.text_config
    dense = DecoderShape.from_config(text)
    tokens = stats.tokens[0].tolist()
    assert tokens[0] > tokens[1] > tokens[3]  # 16 visual tokens -> 8 -> 2
    measured = []
    for layer, (kv_heads, width) in enumerate(zip(text.kv_heads_per_layer, text.intermediate_size_per_layer)):
        shape = DecoderShape(dense.hidden, dense.head_dim, kv_heads, kv_heads, width)  # 1 query per group
        measured.append(sum(counts[f"{LAYERS}.{layer}"].values()))
        assert measured[-1] == int(2 * decoder_layer_macs(tokens[layer], shape)), layer
    assert float(cost_report(loaded.config, stats).flops[0]) == sum(measured)
