"""The testbed model's vision tower carries a fixed 2-D position code."""

from __future__ import annotations

import pytest
import torch

from atp.models.build import sincos_2d
from tests.conftest import tiny_testbed_model


def test_sincos_code_encodes_row_and_column():
    grid, dim = 24, 64
    code = sincos_2d(grid, dim)
    quarter = dim // 4
    frequency = 1.0 / (10000 ** ((quarter - 1) / quarter))  # the slowest: no wrap-around on 24 cells
    row = torch.atan2(code[:, quarter - 1], code[:, 2 * quarter - 1]) / frequency
    col = torch.atan2(code[:, 3 * quarter - 1], code[:, 4 * quarter - 1]) / frequency
    index = torch.arange(grid * grid)
    assert torch.allclose(row, (index // grid).float(), atol=1e-3)
    assert torch.allclose(col, (index % grid).float(), atol=1e-3)


@pytest.fixture(scope="module")
def processor():
    from atp.data.processor import build_processor
    from atp.data.shapes import vocabulary

    return build_processor(vocabulary())


def test_testbed_tower_uses_the_code(processor):
    model = tiny_testbed_model(processor)
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    assert torch.equal(weight[0], torch.zeros_like(weight[0]))
    assert torch.equal(weight[1:], sincos_2d(24, weight.shape[1]))


def test_unknown_position_option_is_refused(processor):
    from atp.models.build import build_testbed_llava

    with pytest.raises(ValueError, match="vision_positions must be 'sincos' or 'random'"):
        build_testbed_llava(processor, hidden_size=32, num_layers=1, vision_hidden=32, vision_positions="learned")


def test_projector_is_standardised_on_shapes_images(processor):
    from atp.models.build import build_testbed_llava, shapes_pixel_values

    model = build_testbed_llava(
        processor, hidden_size=32, intermediate_size=64, num_layers=1, vision_hidden=32, calibration_images=16
    )
    calibration = torch.cat(model.get_image_features(pixel_values=shapes_pixel_values(processor, 16)).pooler_output)
    assert torch.allclose(calibration.mean(0), torch.zeros(32), atol=1e-4)
    assert torch.allclose(calibration.std(0), torch.ones(32), atol=1e-3)
    # other scenes: close to standardised, not exactly
    fresh = torch.cat(model.get_image_features(pixel_values=shapes_pixel_values(processor, 16, seed=9)).pooler_output)
    assert fresh.mean(0).abs().max() < 0.5 and (fresh.std(0) - 1).abs().max() < 0.5


def test_random_projector_keeps_the_hf_init(processor):
    from atp.models.build import build_testbed_llava

    kwargs = dict(hidden_size=32, intermediate_size=64, num_layers=1, vision_hidden=32, calibration_images=4)
    standardised = build_testbed_llava(processor, **kwargs)
    plain = build_testbed_llava(processor, projector_init="random", **kwargs)
    first, last = "model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.weight"
    assert torch.equal(standardised.state_dict()[first], plain.state_dict()[first])
    assert not torch.allclose(standardised.state_dict()[last], plain.state_dict()[last])
    assert plain.state_dict()[last].std() < 0.03  # HF's initializer_range 0.02
    with pytest.raises(ValueError, match="projector_init must be 'standardised' or 'random'"):
        build_testbed_llava(processor, projector_init="zeros", **kwargs)


def test_text_init_std_redraws_only_the_language_model(processor):
    from atp.models.build import build_testbed_llava

    kwargs = dict(hidden_size=32, intermediate_size=64, num_layers=1, vision_hidden=32, calibration_images=4)
    plain = build_testbed_llava(processor, **kwargs)
    wide = build_testbed_llava(processor, text_init_std=0.2, **kwargs)
    for name, weight in plain.state_dict().items():
        redrawn = wide.state_dict()[name]
        if "language_model" in name or name.startswith("lm_head"):
            if "norm" in name:
                assert torch.equal(redrawn, weight), name  # RMSNorm scales stay 1
            elif weight.dim() == 2:
                assert weight.std() < 0.03 and abs(redrawn.std().item() - 0.2) < 0.03, name
        else:
            assert torch.equal(redrawn, weight), name  # tower and projector as without the option
    embeddings = wide.model.language_model.get_input_embeddings().weight
    assert torch.equal(embeddings[processor.tokenizer.pad_token_id], torch.zeros(32))
    assert wide.config.text_config.initializer_range == 0.2
    with pytest.raises(ValueError, match="text_init_std must be positive"):
        build_testbed_llava(processor, text_init_std=0.0, **kwargs)
