"""A brute-force recomputation of a Qwen-VL vision tower's attention from the stock tower, shared by the
adapter's and the vision-side pruners' tests.

It captures each block's input with a pre-hook (in the tower's own sequence order), finds that order
itself (Qwen2.5-VL's window order written as loops from the documented rule and checked against the
rows the tower really received), applies the block's norm, qkv and the tower's rotary module to
positions written as loops, and takes a softmax per query over the keys of its image (or window), one
query at a time."""

from __future__ import annotations

import torch


def forward_with_hooks(model, batch: dict, handles: list) -> None:
    """One forward of `model` on `batch` without gradients; the hook `handles` are removed afterwards."""
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()


def processor_positions(h: int, w: int) -> list[tuple[int, int]]:
    """(row, col) of each tower patch of an h x w image in the processor's order: 2x2 merge units in
    raster order, each unit's 4 patches in raster order."""
    return [(2 * r + dr, 2 * c + dc) for r in range(h // 2) for c in range(w // 2) for dr in (0, 1) for dc in (0, 1)]


def windows_of(h: int, w: int, side: int) -> list[list[int]]:
    """Qwen2.5-VL's windows of one image: lists of merge units (raster numbers), windows of side x side
    units in raster order over the image, the units of a window in raster order."""
    rows, cols = h // 2, w // 2
    out = []
    for wr in range(0, rows, side):
        for wc in range(0, cols, side):
            out.append([r * cols + c for r in range(wr, min(wr + side, rows)) for c in range(wc, min(wc + side, cols))])
    return out


def reference_layout(model, grids: list[list[int]]) -> tuple[list[int], list[int]]:
    """(tower order, group): the processor-order patch at each place of the tower's sequence, and each
    processor-order patch's attention group in windowed blocks (its window; on Qwen2/3: its image)."""
    vision = model.config.vision_config
    order, group, offset, count = [], [], 0, 0
    for _, h, w in grids:
        windowed = hasattr(model.model.visual, "fullatt_block_indexes")
        units = windows_of(h, w, vision.window_size // 2 // vision.patch_size) if windowed else [range(h * w // 4)]
        image_group = [0] * (h * w)
        for window in units:
            for u in window:
                order += [offset + 4 * u + p for p in range(4)]
                for p in range(4):
                    image_group[4 * u + p] = count
            count += 1
        group += image_group
        offset += h * w
    return order, group


def brute_force_attention(model, batch, index: int) -> list[torch.Tensor]:
    """Per image [H, T, T]: block `index`'s attention probabilities between its patches (processor order),
    0 where a query may not attend (other window)."""
    tower = model.model.visual
    inputs, embedded = {}, {}
    handles = [
        tower.blocks[index].register_forward_pre_hook(lambda _m, args: inputs.update(x=args[0])),
        tower.blocks[0].register_forward_pre_hook(lambda _m, args: embedded.update(x=args[0])),
        tower.patch_embed.register_forward_hook(lambda _m, _a, out: embedded.setdefault("patches", out)),
    ]
    forward_with_hooks(model, batch, handles)
    grids = batch["image_grid_thw"].tolist()
    order, group = reference_layout(model, grids)
    if not hasattr(tower, "pos_embed"):  # Qwen3-VL adds position embeddings before block 0
        assert torch.equal(embedded["x"], embedded["patches"][order])  # the order is the tower's
    windowed = hasattr(tower, "fullatt_block_indexes") and index not in tower.fullatt_block_indexes
    x = torch.empty_like(inputs["x"])
    x[order] = inputs["x"]  # processor order
    block = tower.blocks[index]
    attention = block.attn
    heads = attention.num_heads
    with torch.no_grad():
        q, k, _ = attention.qkv(block.norm1(x)).view(x.shape[0], 3, heads, -1).unbind(1)  # [N, H, hd]
        positions = torch.tensor([pos for _, h, w in grids for pos in processor_positions(h, w)])  # [N, 2]
        cos, sin = tower.rotary_pos_emb(x, positions)  # [N, hd]

    def rotate(v):
        half = v.shape[-1] // 2
        turned = torch.cat([-v[..., half:], v[..., :half]], -1)
        return v.float() * cos[:, None].float() + turned.float() * sin[:, None].float()

    q, k = rotate(q), rotate(k)
    out, start = [], 0
    for _, h, w in grids:
        size = h * w
        probs = torch.zeros(heads, size, size)
        for head in range(heads):
            for i in range(size):
                allowed = [
                    j for j in range(size) if not windowed or group[start + j] == group[start + i]
                ]  # the image's patches; in a windowed block, the query's window
                logits = torch.stack([q[start + i, head] @ k[start + j, head] for j in allowed]) * attention.scaling
                probs[head, i, allowed] = torch.softmax(logits, 0)
        out.append(probs)
        start += size
    return out


def check_kept_on_qwen(model, specs: list, build, expected: dict[int, list[list[int]]], counts=None) -> None:
    """Run the pruner `build()` under sdpa and eager, drop and mask, on the ragged batch of `specs` and on
    each sample alone (`qwen_batch`, seeds = sample numbers): after each layer of `expected` ({layer: per
    sample, the sorted image-token numbers kept}) the runtime keeps exactly those; `counts` ({layer: per
    sample}) the visual tokens the layer processes, where they differ from the kept ones (zero padding,
    merged cells); drop and mask give the same last logits."""
    import atp
    from tests.qwen_inputs import qwen_batch

    batch = qwen_batch(specs)
    singles = [qwen_batch([spec], seeds=[b]) for b, spec in enumerate(specs)]
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        for rows, sub in [(list(range(len(specs))), batch), *[([b], singles[b]) for b in range(len(specs))]]:
            logits = {}
            for mode in ("drop", "mask"):
                atp.apply(model, build(), mode=mode)
                try:
                    with torch.no_grad():
                        logits[mode] = model(**sub).logits[:, -1]
                    stats = atp.stats(model)
                finally:
                    atp.remove(model)
                for layer, kept in expected.items():
                    found = [stats.kept[layer][i].tolist() for i in range(len(rows))]
                    assert found == [kept[b] for b in rows], (attn, mode, rows, layer)
                    wanted = counts[layer] if counts else [len(k) for k in kept]
                    assert stats.visual_tokens[:, layer].tolist() == [wanted[b] for b in rows], (attn, mode, layer)
            torch.testing.assert_close(logits["drop"], logits["mask"], rtol=1e-4, atol=1e-4)
