"""The embedded tiny pipelines: deterministic from their seed, and unchanged by save/load."""
import pytest
import torch

from accel.models.tiny import BUILDERS


def _state(pipe) -> dict:
    return {f"{name}.{key}": value for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            for key, value in module.state_dict().items()}


@pytest.mark.parametrize("architecture", sorted(BUILDERS))
def test_same_seed_same_weights_other_seed_other_weights(architecture):
    first, again, other = (_state(BUILDERS[architecture](seed=s)) for s in (0, 0, 1))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_the_tiny_flux_has_both_block_kinds_and_overrides_apply():
    transformer = BUILDERS["flux"](num_layers=3, num_single_layers=1).transformer
    assert len(transformer.transformer_blocks) == 3 and len(transformer.single_transformer_blocks) == 1


def test_a_saved_tiny_pipeline_loads_back_identically(tmp_path):
    pipe = BUILDERS["sd3"]()
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    call = dict(prompt="a red fox", num_inference_steps=2, height=32, width=32, output_type="pt")
    expected = pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).images
    assert torch.equal(loaded(**call, generator=torch.Generator("cpu").manual_seed(0)).images, expected)
    assert loaded.tokenizer_3("a red fox, 4k").input_ids == pipe.tokenizer_3("a red fox, 4k").input_ids
