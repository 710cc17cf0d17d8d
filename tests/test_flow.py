import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from editflow import flow
from editflow.models.build import KONTEXT_SCHEDULER_CONFIG


def test_interpolation_endpoints_and_velocity():
    x0, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    assert torch.equal(flow.add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(flow.add_noise(x0, noise, torch.ones(3)), noise)
    sigma = torch.tensor([0.25, 0.5, 0.9])
    xt = flow.add_noise(x0, noise, sigma)
    # One exact Euler step with the true velocity lands on the data.
    torch.testing.assert_close(xt - sigma.view(-1, 1, 1, 1) * flow.velocity(x0, noise), x0)


def test_shift_matches_diffusers_scheduler():
    steps = 10
    sched = FlowMatchEulerDiscreteScheduler.from_config(KONTEXT_SCHEDULER_CONFIG)
    mu = flow.resolution_mu(1024)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
    ours = flow.shift_sigmas(torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64), mu)
    torch.testing.assert_close(sched.sigmas[:-1].double(), ours, atol=1e-6, rtol=1e-6)


def test_resolution_mu_grows_with_target_tokens():
    assert flow.resolution_mu(256) == 0.5 and abs(flow.resolution_mu(4096) - 1.15) < 1e-9
    assert flow.resolution_mu(1024) < flow.resolution_mu(2304)


def test_sigma_sampling_ranges_and_shift_direction():
    g = torch.Generator().manual_seed(0)
    plain = flow.sample_sigmas(4000, "logit_normal", generator=g)
    assert 0 < plain.min() and plain.max() < 1 and abs(plain.median() - 0.5) < 0.03
    shifted = flow.sample_sigmas(4000, "logit_normal", mu=1.15, generator=torch.Generator().manual_seed(0))
    assert shifted.median() > plain.median() + 0.1  # shift moves training towards noise
    uniform = flow.sample_sigmas(4000, "uniform", generator=g)
    assert abs(uniform.mean() - 0.5) < 0.02
    # SD3's mode sampling with a positive scale puts more mass in the middle than uniform does
    mode = flow.sample_sigmas(4000, "mode", mode_scale=1.29, generator=g)
    middle = lambda s: ((s > 0.25) & (s < 0.75)).float().mean()
    assert 0 < mode.min() and mode.max() < 1 and middle(mode) > middle(uniform) + 0.1
    with pytest.raises(ValueError, match="unknown sigma sampling 'beta'"):
        flow.sample_sigmas(4, "beta")


def test_loss_weightings():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(flow.loss_weights("none", sigmas), torch.ones(3))
    torch.testing.assert_close(flow.loss_weights("sigma_sqrt", sigmas), sigmas ** -2)
    cosmap = flow.loss_weights("cosmap", sigmas)
    assert cosmap[1] == cosmap.max() and torch.isclose(cosmap[0], cosmap[2])  # peaks mid-trajectory, symmetric
    with pytest.raises(ValueError, match="unknown loss weighting"):
        flow.loss_weights("snr", sigmas)


def test_condition_dropout_rates_and_what_qwen_sees():
    from editflow.data.batches import ImageBatch
    from editflow.frozen_encoders import condition_dropout

    n = 20000
    pixels = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    batch = ImageBatch([f"k{i}" for i in range(n)], ["make it red"] * n, pixels, pixels, ["img"] * n)
    torch.manual_seed(0)
    dropped = condition_dropout(batch, 0.1, 0.05, 0.2)
    assert type(dropped) is ImageBatch and dropped.target is batch.target
    kinds = [k.partition("#drop-")[2] for k in dropped.keys]
    for kind, p in (("text", 0.1), ("image", 0.05), ("both", 0.2), ("", 0.65)):
        share = kinds.count(kind) / n
        assert abs(share - p) < 4 * (p * (1 - p) / n) ** 0.5, (kind, share)  # within 4 standard errors
    for kind, text, image in zip(kinds, dropped.instructions, dropped.source_images):
        assert (text == "") == (kind in ("text", "both")) and (image is None) == (kind in ("image", "both"))
    # a new batch: the loader's own is left as it was
    assert set(batch.instructions) == {"make it red"} and set(batch.source_images) == {"img"}
    assert not any("#drop-" in k for k in batch.keys) and condition_dropout(batch, 0, 0, 0) is batch


def test_condition_dropout_of_a_pre_encoded_batch_names_the_stored_states_to_read():
    from editflow.data.batches import EncodedBatch
    from editflow.data.preencoded import EncodedSample
    from editflow.frozen_encoders import FrozenEncoder, condition_dropout, states_field

    tensors = {"target": torch.zeros(16, 2, 2), **{states_field(d): torch.full((3, 8), float(i))
                                                   for i, d in enumerate([None, "text", "image", "both"])}}
    samples = [EncodedSample(f"k{i}", "s.tar", tensors) for i in range(64)]
    batch = EncodedBatch([s.key for s in samples], samples)
    torch.manual_seed(0)
    dropped = condition_dropout(batch, 0.25, 0.25, 0.25)
    assert batch.drops is None and set(dropped.drops) == {None, "text", "image", "both"}
    assert [k.partition("#drop-")[2] or None for k in dropped.keys] == dropped.drops
    states = FrozenEncoder(None, None)(dropped, "cpu")[2]  # each sample reads the states of its outcome
    expected = [float([None, "text", "image", "both"].index(d)) for d in dropped.drops]
    assert states[:, 0, 0].tolist() == expected


def test_sigma_bins_partition_the_batch():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    totals, counts = flow.sigma_bin_losses(losses, torch.tensor([0.1, 0.3, 0.6, 0.95]))
    assert counts.tolist() == [1, 1, 1, 1] and totals.tolist() == [1.0, 2.0, 3.0, 4.0]
    totals, counts = flow.sigma_bin_losses(losses, torch.tensor([0.1, 0.15, 0.2, 0.9]))
    assert counts.tolist() == [3, 0, 0, 1] and totals.sum() == 10.0
    assert flow.sigma_bin_names() == ["0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.00"]


def test_loss_decreases_when_training_the_tiny_editor(tiny_model_cfg):
    from editflow.models.build import build_models

    models = build_models(tiny_model_cfg, seed=1)
    editor = models.editor.train()
    torch.manual_seed(0)
    x0, source = torch.randn(8, 16, 4, 4), torch.randn(8, 16, 4, 4)
    states, mask = torch.randn(8, 6, 64), torch.ones(8, 6, dtype=torch.bool)
    noise = torch.randn_like(x0)
    sigma = torch.rand(8)
    opt = torch.optim.AdamW(editor.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        pred = editor(flow.add_noise(x0, noise, sigma), source, states, mask, sigma, torch.ones(8))
        loss = flow.per_sample_mse(pred, flow.velocity(x0, noise)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_log_region_weights_boost_the_changed_cells_by_how_small_they_are():
    region = torch.zeros(3, 4, 4, dtype=torch.bool)
    region[0, :1, :2] = True  # 2 of 16 cells changed
    region[2] = True  # everything changed
    weights = flow.region_weights("log", region)
    assert weights.shape == (3, 1, 4, 4)
    assert torch.all(weights[0, 0][region[0]] == 1 + 3) and torch.all(weights[0, 0][~region[0]] == 1)
    assert torch.all(weights[1] == 1) and torch.all(weights[2] == 1)  # nothing or all changed: no emphasis
    assert flow.region_weights("none", region) is None
    with pytest.raises(ValueError, match="unknown region weighting 'exp'"):
        flow.region_weights("exp", region)


def test_log_both_region_weights_boost_whichever_part_is_small():
    region = torch.ones(3, 4, 4, dtype=torch.bool)
    region[0, :1, :2] = False  # a background change: 14 cells changed, the 2 cells of an object kept
    region[1] = False  # nothing changed
    region[2, :1, :2] = False
    region[2] = ~region[2]  # a local edit: 2 cells changed
    weights = flow.region_weights("log_both", region)[:, 0]
    kept_boost, changed_boost = 1 + 3, 1 + torch.log2(torch.tensor(16 / 14))
    assert torch.all(weights[0][~region[0]] == kept_boost)
    assert torch.allclose(weights[0][region[0]], changed_boost.expand(14))
    assert torch.all(weights[1] == 1)
    assert torch.all(weights[2][region[2]] == kept_boost)
    assert torch.allclose(weights[2][~region[2]], changed_boost.expand(14))
    log = flow.region_weights("log", region)[:, 0]  # log leaves the kept part at 1
    assert torch.all(log[0][~region[0]] == 1) and torch.equal(log[2], weights[2].where(region[2], 1.0))


def test_region_weighted_loss_scales_each_latent_and_logs_the_plain_loss():
    x0, noise = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    error = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(2, 1, 2, 2)
    editor = lambda *args: error  # predicts a fixed velocity; the target velocity is 0
    weight = torch.tensor([[[[2.0, 1.0], [1.0, 1.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    args = (editor, x0, noise, torch.full((2,), 0.5), None, None, None, None)
    loss, logged = flow.training_loss(*args, region_weight=weight)
    plain = (1 + 4 + 9 + 16) / 4
    assert logged.tolist() == [plain, plain]
    assert loss.item() == pytest.approx(((2 * 1 + 4 + 9 + 16) / 4 + plain) / 2)
    assert flow.training_loss(*args)[0].item() == pytest.approx(plain)


def test_changed_region_from_the_toy_mask_or_from_the_pixels_pooled_to_latents():
    from PIL import Image

    from editflow.data.regions import changed_region, latent_region
    from editflow.data.toy import make_edit

    edit = make_edit(2, seed=5)  # toy edits carry the exact changed region
    from_mask = changed_region(edit.source, edit.target, edit.mask)
    assert np.array_equal(from_mask, np.asarray(edit.mask) > 0)
    source = Image.new("RGB", (16, 8), (200, 200, 200))
    target = source.copy()
    target.putpixel((5, 2), (200, 200, 100))  # a visible change
    target.putpixel((12, 6), (203, 198, 201))  # below the threshold (JPEG-like noise)
    region = changed_region(source, target)
    assert region.shape == (8, 16) and region.sum() == 1 and region[2, 5]
    latent = latent_region(torch.from_numpy(region)[None], (2, 4))  # 4x4-pixel cells
    assert latent.shape == (1, 2, 4) and latent.sum() == 1 and latent[0, 0, 1]
    with pytest.raises(ValueError, match="does not tile"):
        latent_region(torch.from_numpy(region)[None], (3, 4))


def test_image_batches_carry_the_region_when_asked():
    from editflow.data.samples import EditSample
    from editflow.data.stream import collate_images
    from editflow.data.toy import make_edit

    edits = [make_edit(i, seed=6) for i in range(2)]
    samples = [EditSample(e.key, e.source, e.target, e.instruction, e.meta, e.mask) for e in edits]
    samples[1].mask = None  # real data: the region comes from |source - target|
    batch = collate_images(samples, (64, 64), regions=True)
    assert batch.region.shape == (2, 64, 64) and batch.region.dtype == torch.bool
    assert torch.equal(batch.region[0], torch.from_numpy(np.asarray(edits[0].mask) > 0))
    assert batch.region[1].any() and batch.region[1].float().mean() <= edits[1].meta["changed_fraction"]
    assert collate_images(samples, (64, 64)).region is None


def test_pre_encoded_batches_use_the_stored_region_and_name_a_missing_one():
    from editflow.data.batches import EncodedBatch
    from editflow.data.preencoded import EncodedSample
    from editflow.data.regions import batch_region

    region = torch.zeros(4, 4, dtype=torch.uint8)
    region[1, 2] = 1
    stored = EncodedSample("k0", "shard-0.tar", {"target": torch.zeros(16, 4, 4), "region": region})
    assert torch.equal(batch_region(EncodedBatch(["k0"], [stored]), (4, 4)), region.bool()[None])
    old = EncodedSample("k1", "shard-1.tar", {"target": torch.zeros(16, 4, 4)})
    with pytest.raises(KeyError, match="shard-1.tar, key k1: no region tensor.*Re-run `editflow encode`"):
        batch_region(EncodedBatch(["k0", "k1"], [stored, old]), (4, 4))
