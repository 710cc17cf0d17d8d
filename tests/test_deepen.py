"""Growing a trained FLUX transformer by blocks: same function at the start, new blocks that train."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from editflow.models.deepen import deepen, main

CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
              num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
              axes_dims_rope=(2, 2, 4))


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image_ids = torch.zeros(12, 3)
    image_ids[:, 1], image_ids[:, 2] = torch.arange(12) // 4, torch.arange(12) % 4
    return dict(hidden_states=torch.randn(2, 12, 16, generator=g), encoder_hidden_states=torch.randn(2, 5, 24, generator=g),
                pooled_projections=torch.randn(2, 12, generator=g), timestep=torch.rand(2, generator=g),
                guidance=torch.ones(2), img_ids=image_ids, txt_ids=torch.zeros(5, 3))


def _trained_model():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG)
    with torch.no_grad():  # diffusers zero-inits proj_out; a trained model's is not
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_a_deepened_transformer_computes_the_same_function_and_its_new_blocks_train():
    model, inputs = _trained_model(), _inputs()
    with torch.no_grad():
        before = model(**inputs).sample
    deepen(model, num_layers=3, num_single_layers=2)
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (3, 2)
    assert (model.config.num_layers, model.config.num_single_layers) == (3, 2)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, before)

    # The closed gates open under training, and then the new blocks change the output.
    new_blocks = [model.transformer_blocks[1], model.transformer_blocks[2], model.single_transformer_blocks[1]]
    gates = [block.norm1.linear if hasattr(block, "norm1") else block.norm.linear for block in new_blocks]
    start = [gate.weight.detach().clone() for gate in gates]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        loss = (model(**inputs).sample - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(gate.weight, w) for gate, w in zip(gates, start))
    model.eval()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new_blocks[0].attn.parameters())


def test_the_deepen_command_writes_a_transformer_that_loads_and_matches(tmp_path):
    model, inputs = _trained_model(), _inputs()
    model.save_pretrained(tmp_path / "export" / "transformer")
    main([str(tmp_path / "export"), str(tmp_path / "deep"), "--num-single-layers", "3"])
    deep = FluxTransformer2DModel.from_pretrained(tmp_path / "deep").eval()
    assert (deep.config.num_layers, deep.config.num_single_layers) == (1, 3)
    with torch.no_grad():
        assert torch.allclose(deep(**inputs).sample, model(**inputs).sample, atol=1e-6)


def test_deepen_refuses_to_drop_blocks_and_names_the_directory(tmp_path):
    _trained_model().save_pretrained(tmp_path / "t")
    with pytest.raises(SystemExit, match="cannot shrink 1 blocks to 0"):
        main([str(tmp_path / "t"), str(tmp_path / "out"), "--num-layers", "0"])
    with pytest.raises(SystemExit, match="no FLUX transformer here"):
        main([str(tmp_path / "missing"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
