"""Matching budgets across methods: the keep ratio that gives a target average token count."""

from __future__ import annotations


def single_cut_keep_ratio(average_tokens: float, num_visual: int, num_layers: int, layer: int) -> float:
    """Keep ratio r of a one-cut pruner (FastV, random) before `layer` such that the average
    visual tokens per decoder layer, (layer * N + (L - layer) * r * N) / L, equals `average_tokens`.
    """
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside 0..{num_layers - 1}.")
    ratio = (num_layers * average_tokens / num_visual - layer) / (num_layers - layer)
    if not 0 < ratio <= 1:
        floor = layer * num_visual / num_layers
        raise ValueError(
            f"an average of {average_tokens:.1f} visual tokens per layer cannot be reached by one cut before "
            f"layer {layer} of {num_layers} (the layers before it alone average {floor:.1f}); cut earlier."
        )
    return ratio
