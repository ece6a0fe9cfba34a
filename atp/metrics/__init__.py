"""Accounting (analytic FLOPs, KV cache) shared by every method."""

from atp.metrics.accounting import (
    CostReport,
    DecoderShape,
    cost_report,
    decoder_layer_macs,
    kv_cache_bytes,
    prefill_flops,
)

__all__ = ["CostReport", "DecoderShape", "cost_report", "decoder_layer_macs", "kv_cache_bytes", "prefill_flops"]
