"""Export a pruned VLM and load it back ready to prune in drop mode.

    <dir>/atp_config.json      {"format": 1, "pruner": name, "kwargs": {...}, "base_model": ...,
                                "processor": whether the export holds a processor}
    <dir>/pruner.safetensors   the pruner's weights (absent for training-free pruners)
    <dir>/base/                the base model and its processor (`save_pretrained`), unless
                               `base_model` points at an existing directory instead

Any family with an adapter round-trips (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the base model's
class is read back from its config.json.

The directory is written next to its final place and renamed into it, so a crash never
leaves a half-written export.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import load_file, save_file

from atp.data.processor import load_processor
from atp.models.build import load_vlm
from atp.runtime import attach
from atp.runtime.pruner import TokenPruner, build_pruner

FORMAT_VERSION = 1
CONFIG_NAME = "atp_config.json"
WEIGHTS_NAME = "pruner.safetensors"


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a staging directory beside `directory`; on success it replaces `directory` by rename,
    on failure it is deleted, so readers never see a half-written directory."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield staging
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def save_model(directory: str | Path, model, processor) -> Path:
    """`save_pretrained` of the model and its processor, atomically (a plain HF directory)."""
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return Path(directory)


def save_pruned(
    directory: str | Path, model, processor, pruner: TokenPruner, base_reference: str | None = None
) -> Path:
    """Write an export; `base_reference` (a model directory) avoids copying the base weights.
    processor may be None (a model without one, e.g. a tiny test model): `load_pruned` then
    returns None for it."""
    with atomic_directory(directory) as staging:
        if base_reference is None:
            model.save_pretrained(staging / "base")  # hooks are not weights: the stock model is saved
            if processor is not None:
                processor.save_pretrained(staging / "base")
            base = "base"
        else:
            base = str(Path(base_reference).resolve())
        state = {k: v.detach().cpu().contiguous() for k, v in pruner.state_dict().items()}
        if state:
            save_file(state, staging / WEIGHTS_NAME)
        config = {
            "format": FORMAT_VERSION,
            "pruner": pruner.name,
            "kwargs": pruner.build_kwargs(),
            "base_model": base,
            "processor": processor is not None,
        }
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return Path(directory)


def read_export(path: str | Path) -> tuple[dict, Path]:
    """(the export's atp_config.json as a dict, the base model's directory) of an export at `path`;
    a clear error for a directory that is not an export, a corrupt config or another format."""
    directory = Path(path)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{directory} is not an atp export: {CONFIG_NAME} is missing. Export with atp.save_pruned."
        )
    try:
        config = json.loads(config_file.read_text())
        base = config["base_model"]
        _ = config["pruner"], config["kwargs"]  # required keys
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{config_file} is corrupt ({error}); re-export the checkpoint.") from error
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"{config_file} has format {config.get('format')!r}; this atp reads format {FORMAT_VERSION}.")
    return config, (directory / base if not Path(base).is_absolute() else Path(base))


def load_export_pruner(path: str | Path) -> TokenPruner:
    """The export's pruner, built from its config and holding its weights (not attached to a model)."""
    directory = Path(path)
    config, _ = read_export(directory)
    name = config["pruner"]
    pruner = build_pruner(name, **config["kwargs"])
    weights = directory / WEIGHTS_NAME
    expected = pruner.state_dict()
    if expected:
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: the {name!r} pruner has weights. Re-export the checkpoint.")
        try:
            state = load_file(weights)
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{weights} is corrupt ({error}); re-export the checkpoint.") from error
        mismatched = {k for k in expected if k not in state or state[k].shape != expected[k].shape}
        if mismatched or set(state) - set(expected):
            raise ValueError(
                f"{weights} does not match the {name!r} pruner built from {CONFIG_NAME} (mismatched keys: "
                f"{sorted(mismatched | (set(state) - set(expected)))[:5]}). Was the export edited or mixed up?"
            )
        pruner.load_state_dict(state)
    return pruner.eval()


def load_pruned(path: str | Path, mode: str = "drop", dtype: str = "float32", attn_implementation: str = "sdpa"):
    """(model, processor) with the exported pruner attached in `mode` (drop by default); processor
    is None when the export was saved without one."""
    config, base_path = read_export(path)
    pruner = load_export_pruner(path)  # before the base model loads: a bad export fails at once
    with_processor = bool(config.get("processor", True))  # exports before the field always held one
    model, _ = load_vlm(str(base_path), dtype, attn_implementation, with_processor=False)
    processor = load_processor(base_path) if with_processor else None
    attach.apply(model, pruner, mode=mode)
    return model, processor
