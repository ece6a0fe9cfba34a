"""Export of a structurally masked decoder: a smaller checkpoint that loads with
`AutoModelForCausalLM.from_pretrained`, has the parameter count the mask predicts, and
gives the masked model's logits."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

import atp  # noqa: F401  (registers the atp_pruned_* classes)
from atp.structural import StructureMask, decoder_parameters, layer_groups, mask_structures, remove_structures

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_decoder(name: str):
    """A 3-layer GQA decoder: 4 query heads sharing 2 key/value heads, MLP width 48."""
    torch.manual_seed(0)
    config = CONFIGS[name](
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def random_mask(model, seed: int = 1) -> StructureMask:
    generator = torch.Generator().manual_seed(seed)
    groups = layer_groups(model.config)
    attention = [torch.tensor([True, False]), torch.tensor([False, True]), torch.tensor([True, True])]
    channels = [torch.rand(g.mlp_channels, generator=generator) < 0.6 for g in groups]
    return StructureMask(attention, channels)


def masked_logits(model, mask: StructureMask, ids: torch.Tensor) -> torch.Tensor:
    """The masked model's logits (the reference an export must reproduce)."""
    masker = mask_structures(model, mask)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    masker.remove()
    return logits


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_with_from_pretrained_and_equals_the_masked_model(tmp_path, name):
    model = tiny_decoder(name)
    mask = random_mask(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    masked = masked_logits(model, mask, ids)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, masked)  # the mask does something
    remove_structures(model, mask).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.model_type == f"atp_pruned_{name}"
    decoder = sum(p.numel() for p in loaded.model.layers.parameters())
    assert decoder == decoder_parameters(tiny_decoder(name).config, mask)
    assert decoder < decoder_parameters(tiny_decoder(name).config)
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, masked, rtol=1e-5, atol=1e-5)


def test_structural_errors():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="no structural group definitions for model_type 'gpt2'"):
        layer_groups(GPT2Config())
    model = tiny_decoder("llama")
    mask = random_mask(model)
    mask.attention[0] = torch.tensor([False, False])
    with pytest.raises(ValueError, match="layer 0 would lose all its attention groups"):
        remove_structures(model, mask)
    mask.attention[0] = torch.tensor([True])
    with pytest.raises(ValueError, match="do not match the layer's 2 attention groups"):
        mask_structures(model, mask)


def test_export_loads_without_atp_through_trust_remote_code(tmp_path):
    """A fresh interpreter that never imports atp loads the export from its own pruned_model.py."""
    import subprocess
    import sys

    model = tiny_decoder("mistral")
    mask = random_mask(model)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(5))
    masked = masked_logits(model, mask, ids)
    remove_structures(model, mask).save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "pruned_model.py").is_file()
    torch.save({"ids": ids, "logits": masked}, tmp_path / "reference.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "export")!r}, trust_remote_code=True).eval()
assert not any(name.startswith("atp") for name in sys.modules), "atp was imported"
reference = torch.load({str(tmp_path / "reference.pt")!r})
with torch.no_grad():
    torch.testing.assert_close(model(input_ids=reference["ids"]).logits, reference["logits"], rtol=1e-5, atol=1e-5)
print(type(model).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("PrunedMistralForCausalLM")
