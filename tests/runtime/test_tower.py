"""Pruning inside the vision tower: the tower's output on the kept tokens against stock tower layers
run on the brute-force kept sequence; the pruned LLaVA's logits against the stock LLM fed the
kept features; the tower's FLOPs against FlopCounterMode; clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

import atp
from atp.metrics import EncoderShape, cost_report, encoder_layer_macs
from atp.models import get_adapter
from atp.models.tiny import tiny_llava_config
from atp.runtime.pruner import TokenPruner
from tests.conftest import IMAGE, NUM_VISUAL, VOCAB, make_batch, single

RAGGED = [(2, 3), (6, 1), (1, 7)]
DEPTH = 5  # tiny CLIP tower: LLaVA reads hidden_states[-2], the output of layer 3


class FixedCut(TokenPruner):
    """A test pruner: before each tower layer in `cuts`, keep the listed patches (original patch
    numbers, per image of the batch) and drop the other patches."""

    name = "fixed_tower_cut"

    def __init__(self, cuts: dict[int, list[list[int]]], position_ids: str = "compact") -> None:
        super().__init__((), position_ids)
        self.cuts = cuts

    def vision_prune_layers(self, tower):
        return tuple(sorted(self.cuts))

    def prune_vision(self, ctx):
        keep = torch.zeros_like(ctx.valid)
        for image, patches in enumerate(self.cuts[ctx.layer]):
            for slot in range(ctx.valid.shape[1]):
                keep[image, slot] = int(ctx.index[image, slot]) - ctx.tower.prefix in patches
        return keep


# image i of the ragged batch: 16 patches -> 9 / 6 / 12 before layer 1 -> 5 / 2 / 7 before layer 3
CUTS = {
    1: [[0, 1, 2, 5, 7, 9, 11, 14, 15], [3, 4, 8, 10, 12, 13], [0, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 15]],
    3: [[1, 5, 9, 14, 15], [4, 12], [0, 3, 6, 8, 9, 13, 15]],
}
# the same, the second cut before layer 4: on the output of layer 3, the very features the projector reads
CUTS_ON_FEATURES = {1: CUTS[1], DEPTH - 1: CUTS[3]}


def stock_tower_on_kept(model, pixel_values, cuts: dict[int, list[int]]) -> list[torch.Tensor]:
    """Hidden states of one image through stock CLIP layers, removing the cut tokens of the
    sequence by hand before the listed layers: [input of layer 0, output of layer 0, ...]."""
    tower = model.model.vision_tower
    with torch.no_grad():
        sequence = tower.pre_layrnorm(tower.embeddings(pixel_values))  # [1, 17, dv]
        index = list(range(sequence.shape[1]))
        states = [(sequence, list(index))]
        for layer_number, layer in enumerate(tower.encoder.layers):
            if layer_number in cuts:
                chosen = [0] + [slot for slot in range(1, len(index)) if index[slot] - 1 in cuts[layer_number]]
                sequence, index = sequence[:, chosen], [index[slot] for slot in chosen]
                if layer_number == 0:
                    states[0] = (sequence, list(index))
            sequence = layer(sequence, None)
            states.append((sequence, list(index)))
    return states


def per_image(cuts, image):
    return {layer: lists[image] for layer, lists in cuts.items()}


@pytest.mark.parametrize("cuts", [CUTS, CUTS_ON_FEATURES], ids=["before_layer_3", "before_layer_4"])
def test_tower_output_equals_stock_layers_on_the_kept_sequence(model_factory, attn, cuts):
    model = model_factory(attn_implementation=attn, vision_layers=DEPTH)
    batch = make_batch(RAGGED, seed=3)
    atp.apply(model, FixedCut(cuts))
    with torch.no_grad():
        out = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
    atp.remove(model)
    for image in range(3):
        expected = stock_tower_on_kept(model, batch["pixel_values"][image : image + 1], per_image(cuts, image))
        assert len(out.hidden_states) == len(expected) == DEPTH + 1
        for entry, (reference, index) in enumerate(expected):
            got = out.hidden_states[entry][image]  # [17, dv] on the full grid
            assert_close(got[index], reference[0], rtol=1e-5, atol=1e-5)
            cut = [i for i in range(NUM_VISUAL + 1) if i not in index]
            assert bool((got[cut] == 0).all()), (entry, image)


@pytest.mark.parametrize("cuts", [CUTS, CUTS_ON_FEATURES], ids=["before_layer_3", "before_layer_4"])
def test_pruned_llava_equals_stock_llm_on_the_kept_features(model_factory, attn, cuts):
    model = model_factory(attn_implementation=attn, vision_layers=DEPTH)
    batch = make_batch(RAGGED, seed=3)
    lm, projector = model.model.language_model, model.model.multi_modal_projector
    last = max(cuts)
    expected_logits = []
    for b in range(3):
        sample = single(batch, b)
        states = stock_tower_on_kept(model, sample["pixel_values"], per_image(cuts, b))
        features, index = states[DEPTH - 1]  # the output of layer 3 = hidden_states[-2]
        rows = [slot for slot, token in enumerate(index) if token >= 1 and token - 1 in cuts[last][b]]
        assert len(rows) == len(cuts[last][b])
        with torch.no_grad():
            visual = projector(features[0, rows])
            text = model.get_input_embeddings()(sample["input_ids"][0])
            image = (sample["input_ids"][0] == IMAGE).nonzero()[:, 0]
            embeds = torch.cat([text[: image[0]], visual, text[image[-1] + 1 :]])[None]
            expected_logits.append(model.lm_head(lm(inputs_embeds=embeds).last_hidden_state)[0, -1])
    for mode in ("drop", "mask"):
        atp.apply(model, FixedCut(cuts), mode=mode)
        projected = []  # what the projector really receives (registered after atp's own hooks)
        handle = projector.register_forward_pre_hook(lambda _m, args: projected.append(tuple(args[0].shape)))
        with torch.no_grad():
            logits = model(**batch).logits[:, -1]
        handle.remove()
        stats = atp.stats(model)
        atp.remove(model)
        assert projected == [(3, max(len(kept) for kept in cuts[last]), 32)]  # survivors only, padded to 7
        for b in range(3):
            assert stats.kept[0][b].tolist() == cuts[last][b], (mode, b)
            assert stats.visual_tokens[b].tolist() == [len(cuts[last][b])] * 4
            assert_close(logits[b], expected_logits[b], rtol=1e-4, atol=1e-5)
        assert stats.vision_tokens.tolist() == [
            [17] + [1 + len(cuts[max(c for c in cuts if c <= layer)][b]) for layer in range(1, DEPTH)] for b in range(3)
        ]
        assert stats.vision_input_tokens == NUM_VISUAL + 1


def test_generate_after_a_tower_cut_continues_the_pruned_prefill(model_factory):
    model = model_factory(attn_implementation="sdpa", vision_layers=DEPTH)
    batch = make_batch(RAGGED[:1], seed=3)
    atp.apply(model, FixedCut({1: CUTS[1][:1], 3: CUTS[3][:1]}))
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
        first = model(**batch).logits[0, -1].argmax()
    atp.remove(model)
    assert int(generated[0, batch["input_ids"].shape[1]]) == int(first)


def test_tower_flops_equal_the_flop_counter_and_stay_separate(model_factory):
    model = model_factory(attn_implementation="eager", vision_layers=DEPTH)
    batch = make_batch(RAGGED[:1], seed=3)
    atp.apply(model, FixedCut({1: CUTS[1][:1], 3: CUTS[3][:1]}))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    stats = atp.stats(model)
    atp.remove(model)
    counts = counter.get_flop_counts()
    prefix = "LlavaForConditionalGeneration.model.vision_tower.encoder.layers"
    measured = [sum(counts[f"{prefix}.{i}"].values()) for i in range(DEPTH)]
    shape = EncoderShape.from_config(model.config.vision_config)
    tokens = stats.vision_tokens[0].tolist()
    assert tokens == [17, 10, 10, 6, 6]
    assert measured == [int(2 * encoder_layer_macs(n, shape)) for n in tokens]
    report = cost_report(model.config, stats)
    assert int(report.vision_flops[0]) == sum(measured)
    assert int(report.vision_flops_unpruned[0]) == DEPTH * int(2 * encoder_layer_macs(17, shape))
    assert report.vision_flops_ratio == pytest.approx(sum(measured) / float(report.vision_flops_unpruned[0]))
    unpruned_llm = cost_report(model.config.text_config, stats).flops_unpruned
    assert torch.equal(report.flops_unpruned, unpruned_llm)  # the LLM's cost never includes the tower


def test_errors_for_bad_tower_cuts(model_factory):
    model = model_factory(vision_layers=DEPTH)
    with pytest.raises(ValueError, match="past the tower's depth"):
        atp.apply(model, FixedCut({DEPTH: [[0]]}))
    reads_layer_2 = tiny_llava_config(grid=4, vocab_size=VOCAB, vision_layers=DEPTH)
    reads_layer_2.vision_feature_layer = -3  # hidden_states[-3]: the output of layer 2 of 5
    with pytest.raises(ValueError, match="cannot change what the projector reads"):
        atp.apply(LlavaForConditionalGeneration(reads_layer_2).eval(), FixedCut({DEPTH - 1: [[0]]}))
    with pytest.raises(ValueError, match="past the tower's depth"):
        atp.apply(model, atp.build_pruner("flowcut", keep_tokens=4, last_layer=DEPTH + 2))
    batch = make_batch(RAGGED[:1], seed=3)
    with torch.no_grad():  # image features encoded by the stock tower, then handed to the pruned model
        encoded = model.model.get_image_features(pixel_values=batch["pixel_values"])
    atp.apply(model, FixedCut({1: [[0, 1]]}))
    with pytest.raises(ValueError, match="tower did not run"), torch.no_grad():
        model(input_ids=batch["input_ids"], mm_encoder_outputs={"image": encoded})
    atp.remove(model)
    assert get_adapter(model).tower_layout().feature_layers == DEPTH - 1


def tiny_siglip_llava():
    """A tiny LLaVA whose tower has no [CLS] token (SigLIP), all its tokens passed on ("full")."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from atp.models.tiny import tiny_llava_config

    text = tiny_llava_config(vocab_size=VOCAB, grid=4).text_config
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=16, patch_size=4
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        image_seq_length=NUM_VISUAL,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
    )
    return LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("name", ["flowcut", "zero_tprune"])
def test_towers_without_cls_are_refused(name):
    from tests.qwen_inputs import qwen_model

    with pytest.raises(ValueError, match=r"needs a \[CLS\] token.*SiglipVisionModel has none"):
        atp.apply(tiny_siglip_llava(), atp.build_pruner(name, keep_tokens=4))
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        atp.apply(qwen_model("qwen2_vl"), atp.build_pruner(name, keep_tokens=4))


def test_tower_attentions_come_back_on_the_grid(model_factory):
    """output_attentions of the pruned tower: each layer's map over its own tokens, zeros elsewhere."""
    model = model_factory(attn_implementation="eager", vision_layers=DEPTH)
    batch = make_batch(RAGGED, seed=3)
    atp.apply(model, FixedCut(CUTS))
    with torch.no_grad():
        out = model.model.vision_tower(batch["pixel_values"], output_attentions=True)
    atp.remove(model)
    for image in range(3):
        states = stock_tower_on_kept(model, batch["pixel_values"][image : image + 1], per_image(CUTS, image))
        for layer_number, layer in enumerate(model.model.vision_tower.encoder.layers):
            sequence, index = states[layer_number][0], states[layer_number + 1][1]
            with torch.no_grad():
                _, expected = layer.self_attn(
                    layer.layer_norm1(
                        sequence if layer_number not in CUTS else _cut(sequence, states[layer_number][1], index)
                    )
                )
            got = out.attentions[layer_number][image]
            assert_close(got[:, index][:, :, index], expected[0], rtol=1e-5, atol=1e-6)
            assert float(got.sum()) == pytest.approx(len(index) * got.shape[0], rel=1e-5)  # nothing elsewhere


def _cut(sequence, before, after):
    """The rows of `sequence` (tokens `before`) that hold tokens `after`."""
    return sequence[:, [before.index(i) for i in after]]
