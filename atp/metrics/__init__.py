"""Accounting (analytic FLOPs, KV cache) shared by every method."""

from atp.metrics.accounting import (
    CostReport,
    DecoderShape,
    EncoderShape,
    cost_report,
    decoder_layer_macs,
    encoder_layer_macs,
    kv_cache_bytes,
    prefill_flops,
    vision_flops,
)

__all__ = [
    "CostReport",
    "DecoderShape",
    "EncoderShape",
    "cost_report",
    "decoder_layer_macs",
    "encoder_layer_macs",
    "kv_cache_bytes",
    "prefill_flops",
    "vision_flops",
]
