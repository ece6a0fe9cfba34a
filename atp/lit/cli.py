"""What train.py and evaluate.py do around Hydra: check overrides before composing, list only
the config groups a script takes in its --help, and leave no empty run folder after a failure.

Hydra refuses an unknown key with "Key 'x' is not in struct ... use +x" (which invites adding
the typo). `unknown_key_error` checks every `key=value` override against the config the
script composes, before Hydra runs, and names the unknown key with the closest valid keys.
"""

from __future__ import annotations

import contextlib
import difflib
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf


def config_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of `cfg` (nodes and leaves), without resolving interpolations."""
    keys = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            keys += config_keys(child, f"{path}.")
    return keys


def first_unknown(cfg: DictConfig, key: str) -> tuple[str, DictConfig] | None:
    """(the shortest unknown prefix of dotted `key`, the node it is missing from), or None when
    `key` exists or its path runs through a value or list (Hydra's own error covers that)."""
    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig) or node._is_none():
            return None
        if part not in node.keys():
            return ".".join(parts[: depth + 1]), node
        node = node._get_node(part)
        if isinstance(node, ListConfig):
            return None
    return None


def unknown_key_error(script: str, config_dir: Path, config_name: str, args: Sequence[str]) -> str | None:
    """The error message for the first override in `args` whose key `config_name` does not
    have (after the group choices in `args`), or None when every key exists.

    Skipped, for Hydra to handle: flags other than -m / --multirun (--help, --cfg, ...),
    `+key` / `++key` / `~key`, hydra.* keys and group choices (Hydra lists the options).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if GlobalHydra.instance().is_initialized():
        raise RuntimeError("unknown_key_error composes its own config: call it before Hydra is initialized.")
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # a syntax error: Hydra reports it with the offending character
        return None
    groups, values = [], []
    for override in overrides:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or override.is_add() or override.is_delete():
            continue
        if override.is_force_add():
            continue
        if (config_dir / key).is_dir():
            choice = next(override.sweep_string_iterator()) if override.is_sweep_override() else None
            groups.append(f"{key}={choice}" if choice is not None else override.input_line)
        else:
            values.append(override)
    if not values:
        return None
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=groups)
    except Exception:  # a wrong group choice: Hydra's error lists the options
        return None
    for override in values:
        found = first_unknown(cfg, override.key_or_group)
        if found is None:
            continue
        unknown, parent = found
        head, _, last = unknown.rpartition(".")
        prefix = f"{head}." if head else ""
        siblings = sorted(str(k) for k in parent.keys())
        close = [prefix + k for k in difflib.get_close_matches(last, siblings, n=3, cutoff=0.6)]
        close += difflib.get_close_matches(override.key_or_group, config_keys(cfg), n=3, cutoff=0.6)
        close = list(dict.fromkeys(close))[:3]  # the unknown part's neighbours first, then whole keys
        where = head or None
        message = f"{script}: unknown config key '{unknown}' (in the override '{override.input_line}')."
        if close:
            message += " Did you mean: " + ", ".join(close) + "?"
        message += f" Valid keys {'under ' + repr(where) if where else 'at the top level'}: {', '.join(siblings)}."
        message += f" python {script} --cfg job prints the whole config."
        return message
    return None


def exit_on_unknown_keys(script: str, config_dir: Path, config_name: str, args: Sequence[str]) -> None:
    """Exit with `unknown_key_error`'s message (status 1, as Hydra's errors) when an override
    names no key of the config."""
    message = unknown_key_error(script, config_dir, config_name, args)
    if message:
        raise SystemExit(f"Error: {message}")


HYDRA_BOOKKEEPING = (".hydra",)  # what Hydra writes into every run folder (plus <job name>.log)


@contextlib.contextmanager
def no_empty_run_dir_on_failure(output_dir: str | Path, job_name: str) -> Iterator[None]:
    """On an exception, delete `output_dir` if it holds nothing but Hydra's own files (its
    .hydra/ folder and `<job_name>.log`), so a failed run leaves no empty timestamped folder;
    a folder with anything else in it is left alone. The exception propagates."""
    try:
        yield
    except BaseException:
        folder = Path(output_dir)
        ours = {*HYDRA_BOOKKEEPING, f"{job_name}.log"}
        if folder.is_dir() and all(entry.name in ours for entry in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def register_help_resolver(config_dir: Path) -> None:
    """`${atp_config_groups:data,pruner}` in a --help template: "group: option, ..." lines for
    the named groups only (Hydra's $APP_CONFIG_GROUPS lists every group under conf/)."""

    def groups(*names: str) -> str:
        lines = []
        for name in names:
            options = sorted(p.stem for p in (config_dir / name).glob("*.yaml"))
            lines.append(f"{name}: {', '.join(options)}")
        return "\n".join(lines)

    OmegaConf.register_new_resolver("atp_config_groups", groups, replace=True)
