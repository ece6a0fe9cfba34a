"""VFlowOpt keeps exactly the tokens a brute-force recomputation from HF's own eager vision attentions
and the raw pixels keeps (plain loops over the documented rule), on prompts with one or several images."""

from __future__ import annotations

import math

import pytest
import torch

import atp
from tests.conftest import GRID, IMAGE, NUM_VISUAL, PAD, VOCAB

PATCH = 4  # the tiny tower's patch size
LAYERS = (0, 2)


def multi_image_batch(samples: list[tuple[int, int, int]], seed: int = 0) -> dict:
    """Left-padded prompts [bos, prefix, (<image>*16, text)*images, suffix]: samples = (prefix, images, suffix)."""
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, VOCAB - 1, (n,), generator=generator)  # noqa: E731
    rows = []
    for prefix, images, suffix in samples:
        parts = [torch.tensor([1]), text(prefix)]
        for _ in range(images):
            parts += [torch.full((NUM_VISUAL,), IMAGE), text(2)]
        rows.append(torch.cat(parts + [text(suffix)]))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row) :], mask[b, length - len(row) :] = row, 1
    pixels = torch.randn(sum(s[1] for s in samples), 3, GRID * PATCH, GRID * PATCH, generator=generator)
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)


def entropy_by_loops(patch: torch.Tensor) -> float:
    """Entropy (bits) of one [3, p, p] patch's grey histogram, pixel by pixel."""
    counts: dict[int, int] = {}
    for y in range(patch.shape[1]):
        for x in range(patch.shape[2]):
            levels = [int(float(patch[c, y, x]) * 255) % 256 for c in range(3)]  # int() truncates, % wraps
            grey = round(sum(0.3333 * v for v in levels))
            counts[grey] = counts.get(grey, 0) + 1
    total = sum(counts.values())
    return -sum(n / total * math.log2(n / total + 1e-10) for n in counts.values())


def brute_force_maps(model, batch, vision_layer: int, t: float, alpha: float) -> list[torch.Tensor]:
    """Per image: [16] map = mean over global queries of the head-mean attention + alpha softmax(entropy)."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    maps = []
    for image in range(batch["pixel_values"].shape[0]):
        attn = attentions[vision_layer][image].mean(0)[1:, 1:]  # patches only ([CLS] is token 0)
        received = [sum(float(attn[i, j]) for i in range(NUM_VISUAL)) / NUM_VISUAL for j in range(NUM_VISUAL)]
        mean = sum(received) / NUM_VISUAL
        chosen = [i for i in range(NUM_VISUAL) if received[i] > t * mean] or list(range(NUM_VISUAL))
        context = [sum(float(attn[i, j]) for i in chosen) / len(chosen) for j in range(NUM_VISUAL)]
        pixels = batch["pixel_values"][image]
        entropy = [
            entropy_by_loops(
                pixels[:, (j // GRID) * PATCH : (j // GRID + 1) * PATCH, (j % GRID) * PATCH :][:, :, :PATCH]
            )
            for j in range(NUM_VISUAL)
        ]
        norm = sum(math.exp(e) for e in entropy)
        maps.append(torch.tensor([context[j] + alpha * math.exp(entropy[j]) / norm for j in range(NUM_VISUAL)]))
    return maps


def brute_force_vflowopt(model, batch, ratios, t, alpha, grid=None):
    """Per stage, per sample: the kept image-token numbers (hosts of merged cells included) and the hosts."""
    maps = brute_force_maps(model, batch, -2, t, alpha)
    kept_per_stage, hosts_all, image = [], [], 0
    per_sample = [int((row == IMAGE).sum()) // NUM_VISUAL for row in batch["input_ids"]]
    scores = []
    for count in per_sample:
        scores.append(torch.cat(maps[image : image + count]))
        image += count
    for b, score in enumerate(scores):
        n = len(score)
        order = sorted(range(n), key=lambda j: (-float(score[j]), j))  # ties: the earlier token first
        delete = round(n * (1 - ratios[0]))  # Python's round, as the official code
        extra = int(n / (grid * grid)) if grid else 0
        alive = sorted(order[: n - delete - extra])
        hosts = []
        if grid:
            cells: dict[tuple, list[int]] = {}
            for j in order[n - delete - extra :]:
                image_in_sample, token = divmod(j, NUM_VISUAL)
                key = (image_in_sample, math.floor((token // GRID) / grid), math.floor((token % GRID) / grid))
                cells.setdefault(key, []).append(j)
            for members in cells.values():
                hosts.append(max(members, key=lambda j: (float(score[j]), -j)))
        stages = [sorted(alive + hosts)]
        for ratio in ratios[1:]:
            present = stages[-1]
            n = len(present)
            ranked = sorted(present, key=lambda j: (-float(score[j]), j))
            stages.append(sorted(ranked[: n - round(n * (1 - ratio))]))
        kept_per_stage.append(stages)
        hosts_all.append(sorted(hosts))
    return kept_per_stage, hosts_all, scores


RAGGED = [(2, 2, 3), (6, 1, 1), (1, 3, 2)]


@pytest.mark.parametrize("samples", [RAGGED, RAGGED[:1]], ids=["batch3", "batch1"])
@pytest.mark.parametrize("grid", [None, 2.0])
@pytest.mark.parametrize("ratios", [(0.5, 0.5), (0.84375, 0.5)])  # 16 x 0.15625 = 2.5: Python rounds to 2
def test_vflowopt_matches_brute_force_under_sdpa_and_eager(model_factory, samples, grid, ratios):
    batch = multi_image_batch(samples, seed=3)
    model = model_factory(attn_implementation="eager")
    t, alpha = 1.0, 0.3
    stages, hosts, _ = brute_force_vflowopt(model, batch, ratios, t, alpha, grid)
    build = lambda: atp.build_pruner(  # noqa: E731
        "vflowopt", layers=LAYERS, keep_ratios=ratios, t=t, alpha=alpha, merge_grid=grid, setting=None
    )
    for attn in ("sdpa", "eager"):
        logits = {}
        for mode in ("drop", "mask"):
            model.set_attn_implementation(attn)
            atp.apply(model, build(), mode=mode)
            with torch.no_grad():
                logits[mode] = model(**batch).logits[:, -1]
            stats = atp.stats(model)
            atp.remove(model)
            for b in range(len(samples)):
                for stage, layer in enumerate(LAYERS):
                    expected = [j for j in stages[b][stage] if j not in hosts[b]]
                    assert stats.kept[layer][b].tolist() == expected, (attn, mode, b, layer)
                    assert int(stats.visual_tokens[b, layer]) == len(stages[b][stage]), (attn, mode, b, layer)
        torch.testing.assert_close(logits["drop"], logits["mask"], rtol=1e-4, atol=1e-4)


def test_recycled_token_is_the_map_weighted_mean_of_its_cell(model_factory):
    batch = multi_image_batch(RAGGED[:1], seed=5)
    model = model_factory(attn_implementation="eager")
    ratios, t, alpha, grid = (0.5, 1.0), 1.0, 0.3, 2.0
    stages, hosts, scores = brute_force_vflowopt(model, batch, ratios, t, alpha, grid)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"].clamp_max(VOCAB - 2))
        features = model.get_image_features(pixel_values=batch["pixel_values"])
    features = torch.cat(list(getattr(features, "pooler_output", features))).reshape(-1, embeds.shape[-1])
    seen = {}
    atp.apply(
        model,
        atp.build_pruner(
            "vflowopt", layers=LAYERS, keep_ratios=ratios, t=t, alpha=alpha, merge_grid=grid, setting=None
        ),
    )

    def capture(_module, args, kwargs):
        seen.setdefault("hidden", (args[0] if args else kwargs["hidden_states"]).clone())

    hook = model.model.language_model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    hook.remove()
    atp.remove(model)
    score = scores[0]
    n = len(score)
    order = sorted(range(n), key=lambda j: (-float(score[j]), j))
    deleted = order[n - round(n * (1 - ratios[0])) - int(n / (grid * grid)) :]
    ids = batch["input_ids"][0]
    visual_positions = (ids == IMAGE).nonzero()[:, 0]
    kept_positions = sorted((ids != IMAGE).nonzero()[:, 0].tolist() + visual_positions[stages[0][0]].tolist())
    assert hosts[0], "the test needs at least one recycled cell"
    merged_cells = 0
    for host in hosts[0]:
        image_in_sample, token = divmod(host, NUM_VISUAL)
        cell = (math.floor((token // GRID) / grid), math.floor((token % GRID) / grid))
        members = [
            j
            for j in deleted
            if j // NUM_VISUAL == image_in_sample
            and (math.floor((j % NUM_VISUAL // GRID) / grid), math.floor((j % NUM_VISUAL % GRID) / grid)) == cell
        ]
        weights = torch.tensor([float(score[j]) for j in members])
        expected = (weights[:, None] / weights.sum() * features[members]).sum(0)
        slot = kept_positions.index(int(visual_positions[host]))  # drop mode: kept tokens in input order
        torch.testing.assert_close(seen["hidden"][0, slot], expected.to(seen["hidden"].dtype), rtol=1e-5, atol=1e-6)
        merged_cells += len(members) > 1
    assert merged_cells > 0  # some cell really merged several tokens


def test_published_settings_and_bad_input():
    pruner = atp.build_pruner("vflowopt")
    assert pruner.budgets[0] == pytest.approx(0.11661529508161146) and pruner.merge_grid == pytest.approx(
        17.386981849158786
    )
    with pytest.raises(ValueError, match="first stage must be layer 0"):
        atp.build_pruner("vflowopt", layers=[2, 4], keep_ratios=[0.5, 0.5], t=1.0, alpha=0.0, setting=None)
    with pytest.raises(ValueError, match="2 budgets for the 3 stages"):
        atp.build_pruner("vflowopt", keep_ratios=[0.5, 0.5], setting=None, t=1.0, alpha=0.0)
    with pytest.raises(ValueError, match="one of them"):
        atp.build_pruner("vflowopt", layers=[0], keep_ratios=[0.5], keep_tokens=[4], t=1.0, alpha=0.0, setting=None)
    with pytest.raises(ValueError, match="setting must be one of"):
        atp.build_pruner("vflowopt", setting="33%")
    with pytest.raises(FileNotFoundError, match="job=vflowopt"):
        atp.build_pruner("vflowopt", recipe="/nonexistent/recipe.json")


def test_keep_tokens_over_the_image_is_refused(model_factory):
    model = model_factory()
    batch = multi_image_batch([(2, 1, 2)])
    atp.apply(model, atp.build_pruner("vflowopt", layers=[0], keep_tokens=[40], t=1.0, alpha=0.0, setting=None))
    with pytest.raises(ValueError, match="keep_tokens=40 at layer 0 is more than the 16"):
        with torch.no_grad():
            model(**batch)


def test_vflowopt_on_internvl_tiles_matches_brute_force():
    """InternVL [ours]: a visual token holds 2x2 tower patches; its attention to another token is the mean over
    its 4 patches' rows of the sum over the other's 4 patches, its entropy that of its 16 pixels, per tile."""
    from tests.internvl_inputs import SIDE, internvl_batch, internvl_model, token_places
    from tests.token.test_internvl_vision_side import patches, tower_outputs

    specs = [(2, [3], 3), (3, [], 6), (1, [2, 1], 2)]
    model = internvl_model()
    batch = internvl_batch(specs)
    attentions = tower_outputs(model, batch).attentions[-1].mean(1)  # [tiles, 65, 65]
    t, alpha, ratios = 1.0, 0.3, (0.5, 0.5)
    reference = []
    for places in token_places(batch, specs):
        score = {}
        for tile in sorted({p[1] for p in places}):
            tokens = [i for i, p in enumerate(places) if p[1] == tile]
            cells = [patches(places[i][2], places[i][3]) for i in tokens]
            block = [[sum(float(attentions[tile, q, k]) for q in a for k in b) / 4 for b in cells] for a in cells]
            n = len(tokens)
            received = [sum(block[i][j] for i in range(n)) / n for j in range(n)]
            chosen = [i for i in range(n) if received[i] > t * sum(received) / n] or list(range(n))
            pixels = batch["pixel_values"][tile]
            entropy = []
            for i in tokens:
                row, col = places[i][2], places[i][3]
                entropy.append(entropy_by_loops(pixels[:, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]))
            norm = sum(math.exp(e) for e in entropy)
            for j, i in enumerate(tokens):
                score[i] = sum(block[c][j] for c in chosen) / len(chosen) + alpha * math.exp(entropy[j]) / norm
        kept = list(range(len(places)))
        stages = []
        for ratio in ratios:
            n = len(kept)
            kept = sorted(sorted(kept, key=lambda i: (-score[i], i))[: n - round(n * (1 - ratio))])
            stages.append(kept)
        reference.append(stages)
    assert SIDE == 8
    build = lambda: atp.build_pruner(  # noqa: E731
        "vflowopt", layers=[0, 2], keep_ratios=ratios, t=t, alpha=alpha, merge_grid=None, setting=None, vision_layer=-1
    )
    for mode in ("drop", "mask"):
        atp.apply(model, build(), mode=mode)
        with torch.no_grad():
            model(**batch)
        stats = atp.stats(model)
        atp.remove(model)
        for b in range(len(specs)):
            for stage, layer in enumerate((0, 2)):
                assert stats.kept[layer][b].tolist() == (reference[b][stage] if reference[b] else []), (mode, b, layer)


def test_vflowopt_generate_continues_the_recycled_prefix(model_factory):
    """generate (KV cache, compact positions) with one recycling stage before the LLM equals greedy decoding of
    the stock LLM on the brute-force shortened input: kept tokens and each cell's map-weighted mean in input order."""
    samples = [(2, 2, 3), (6, 1, 1), (1, 3, 2)]
    batch = multi_image_batch(samples, seed=9)
    model = model_factory(attn_implementation="eager")
    ratios, t, alpha, grid = (0.5,), 1.0, 0.3, 2.0
    stages, hosts, scores = brute_force_vflowopt(model, batch, ratios, t, alpha, grid)
    lm = model.model.language_model
    with torch.no_grad():
        features = model.get_image_features(pixel_values=batch["pixel_values"])
    features = torch.cat(list(getattr(features, "pooler_output", features))).reshape(-1, lm.config.hidden_size)
    model.set_attn_implementation("sdpa")
    atp.apply(model, atp.build_pruner("vflowopt", layers=[0], keep_ratios=ratios, t=t, alpha=alpha, merge_grid=grid))
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)[:, -3:]
    atp.remove(model)
    first_image = 0
    for b, (prefix, images, suffix) in enumerate(samples):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        own = features[first_image * NUM_VISUAL : (first_image + images) * NUM_VISUAL]
        first_image += images
        score, n = scores[b], images * NUM_VISUAL
        order = sorted(range(n), key=lambda j: (-float(score[j]), j))
        deleted = order[n - round(n * (1 - ratios[0])) - int(n / (grid * grid)) :]
        rows = {}
        for j in stages[b][0]:
            if j not in hosts[b]:
                rows[j] = own[j]
                continue
            image, token = divmod(j, NUM_VISUAL)
            cell = (token // GRID // grid, token % GRID // grid)
            members = [
                k
                for k in deleted
                if k // NUM_VISUAL == image and (k % NUM_VISUAL // GRID // grid, k % NUM_VISUAL % GRID // grid) == cell
            ]
            weights = torch.tensor([float(score[k]) for k in members])
            rows[j] = (weights[:, None] / weights.sum() * own[members]).sum(0)
        with torch.no_grad():
            text = model.get_input_embeddings()(ids.clamp_max(VOCAB - 2))
        pieces, number = [], 0
        for position in range(len(ids)):
            if int(ids[position]) != IMAGE:
                pieces.append(text[position])
            elif number in rows:
                pieces.append(rows[number])
            number += int(ids[position]) == IMAGE
        embeds = torch.stack(pieces)[None]
        tokens = []
        with torch.no_grad():
            for _ in range(3):
                token = model.lm_head(lm(inputs_embeds=embeds).last_hidden_state)[0, -1].argmax()
                tokens.append(int(token))
                embeds = torch.cat([embeds, model.get_input_embeddings()(token)[None, None]], 1)
        assert generated[b].tolist() == tokens, b
