"""The vision-tower probes a pruner reads (`ctx.vision_cls_attention`,
`ctx.vision_attention_received`) equal HF's eager CLIP `output_attentions`, per visual slot, in a
ragged batch under sdpa; `vision_probe_layers_in` lets the captured set depend on the depth."""

from __future__ import annotations

import torch
from torch.testing import assert_close

import atp
from atp.runtime.pruner import TokenPruner
from tests.conftest import NUM_VISUAL, make_batch

RAGGED = [(2, 3), (6, 1), (1, 7)]


class Recorder(TokenPruner):
    """Keeps every token; records the vision probes of every layer from 1 on."""

    name = "vision_probe_recorder"

    def __init__(self) -> None:
        super().__init__([0])
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.depth = None
        self.refused = ""

    def vision_probe_layers(self) -> set[int]:
        return {-1}

    def vision_probe_layers_in(self, depth: int) -> set[int]:
        self.depth = depth
        return set(range(1, depth))

    def prune(self, ctx):
        try:
            ctx.vision_cls_attention(0)
        except ValueError as error:  # layer 0 was not listed, so not captured
            self.refused = str(error)
        for layer in range(1, self.depth):
            self.seen[layer] = (ctx.vision_cls_attention(layer), ctx.vision_attention_received(layer), ctx.visual)
        return ctx.visual


def test_vision_probes_equal_hf_eager_attentions(model_factory):
    model = model_factory(attn_implementation="eager", vision_layers=3)
    batch = make_batch(RAGGED, seed=2)
    with torch.no_grad():
        attentions = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    recorder = Recorder()
    atp.apply(model, recorder)
    with torch.no_grad():
        model(**batch)
    atp.remove(model)
    assert recorder.depth == 3 and sorted(recorder.seen) == [1, 2]
    assert "vision layer 0 is not in vision_probe_layers()" in recorder.refused
    for layer, (cls_rows, received, visual) in recorder.seen.items():
        for b in range(len(RAGGED)):
            slots = visual[b].nonzero()[:, 0]
            assert len(slots) == NUM_VISUAL
            assert_close(cls_rows[b][:, slots], attentions[layer][b, :, 0, 1:])
            assert_close(received[b][:, slots], attentions[layer][b, :, :, 1:].mean(1))
            assert not cls_rows[b][:, ~visual[b]].any() and not received[b][:, ~visual[b]].any()
