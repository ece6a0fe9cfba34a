"""The token-pruning API on a tiny, randomly initialised LLaVA (seconds, CPU).

python examples/prune_tiny_llava.py
"""

import torch

import atp
from atp.metrics import cost_report
from atp.models.tiny import tiny_llava

model = tiny_llava(grid=24, patch_size=14, num_layers=8)  # LLaVA-1.5 geometry: 24x24 visual tokens
image = model.config.image_token_id
prompt = torch.cat(
    [torch.tensor([1]), torch.randint(3, 100, (35,)), torch.full((576,), image), torch.randint(3, 100, (20,))]
)
inputs = dict(
    input_ids=prompt[None],
    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    pixel_values=torch.randn(1, 3, 336, 336),
)

atp.apply(model, atp.build_pruner("fastv", layer=2, keep_ratio=0.25), mode="drop")
generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
stats = atp.stats(model)
report = cost_report(model.config.text_config, stats)
print("pruners available:", atp.available_pruners())
print("generated ids:", generated[0, -8:].tolist())
print("visual tokens per decoder layer:", stats.visual_tokens[0].tolist())
print("average visual tokens per layer:", float(stats.average_visual_tokens()[0]))
print(f"prefill FLOPs vs unpruned: {report.flops_ratio:.3f}   KV cache vs unpruned: {report.kv_ratio:.3f}")
atp.remove(model)
