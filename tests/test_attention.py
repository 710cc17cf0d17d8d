"""Padding never reaches attention, on every backend `model.attention_backend` offers; fewer padded batches.

FlashAttention cannot be installed on these machines. Its kernels are replaced, where diffusers' dispatcher
and editflow look them up, by exact float64 stand-ins (flash-attn's FA2 fixed-length and varlen kernels, FA3's
varlen kernel, PyTorch's varlen FA2, and the SDPA kernel choice of the `_native_*` backends), so each
backend's own code path runs, diffusers' code around the kernel included.
"""

import contextlib
import itertools
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.attention.varlen
from diffusers.models import attention_dispatch
from omegaconf import OmegaConf

from editflow.data.batches import EncodedBatch
from editflow.data.preencoded import EncodedSample
from editflow.data.shards import shard_urls
from editflow.data.stream import BucketStream, ShardSet
from editflow.data.toy import make_edit
from editflow.data.toy_shards import write_toy_shards
from editflow.frozen_encoders import FrozenEncoder, TextBucketKey, pad_states, text_padded
from editflow.models.attention import (ALIASES, PLANS, VARLEN_KERNELS, AttentionPlan, attention_plan,
                                       check_attention_backend, joint_attention)
from editflow.models.build import build_models
from editflow.models.editor import visible_text
from editflow.pipeline import EditPipeline

OFFERED = sorted(PLANS)
QWEN_DIM = 64  # the tiny Qwen's width


# -- exact stand-ins for the FlashAttention kernels ---------------------------------------------------------
def _softmax_attention(q, k, v, scale=None):
    """(Lq, H, D) queries over (Lk, H, D) keys and values, in float64."""
    out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(0, 1).double() for x in (q, k, v)),
                                                           scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_attn_probs=False, **_):
    assert dropout_p == 0 and not causal and not return_attn_probs
    return torch.stack([_softmax_attention(*qkv, softmax_scale) for qkv in zip(q, k, v)])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, **_):
    """Segment i of q attends to segment i of k and v. Rows outside every segment are undefined in the real
    kernels: NaN here, so a layout that leaves one uncovered poisons the gradients."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and dropout_p == 0 and not causal
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = [torch.full_like(q[: bounds_q[0]], float("nan"))]
    for (a, b), (c, d) in zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k)):
        assert 0 < b - a <= max_seqlen_q and 0 < d - c <= max_seqlen_k, "empty or over-long varlen segment"
        pieces.append(_softmax_attention(q[a:b], k[c:d], v[c:d], softmax_scale))
    return torch.cat(pieces + [torch.full_like(q[bounds_q[-1]:], float("nan"))])


def flash_attn_3_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                             seqused_k=None, softmax_scale=None, causal=False, **_):
    assert seqused_q is None and seqused_k is None
    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale=softmax_scale, causal=causal)
    return out, torch.zeros(q.shape[1], q.shape[0])  # FA3 builds that also return the log-sum-exp


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, **_):
    return flash_attn_varlen_func(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=scale)


@pytest.fixture
def exact_kernels(monkeypatch):
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", True)
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN_3", True)
    monkeypatch.setattr(attention_dispatch, "flash_attn_func", flash_attn_func)
    monkeypatch.setattr(attention_dispatch, "flash_attn_varlen_func", flash_attn_varlen_func)
    monkeypatch.setattr(attention_dispatch, "flash_attn_3_varlen_func", flash_attn_3_varlen_func)
    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", varlen_attn)
    # cuDNN and mem-efficient SDPA do not exist on a CPU: SDPA's own CPU kernel stands in for them
    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", lambda *_, **__: contextlib.nullcontext())


def tiny_editor(tiny_model_cfg, backend: str, text_pad_multiple: int = 1):
    """The tiny editor on `backend`; exact text lengths by default, so different lengths are padded batches."""
    cfg = OmegaConf.merge(tiny_model_cfg, {"attention_backend": backend, "text_pad_multiple": text_pad_multiple})
    return build_models(cfg, seed=0, training=True, qwen_dim=QWEN_DIM).editor


def _assert_grads_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


# -- the plans ----------------------------------------------------------------------------------------------
def test_every_plan_names_a_real_kernel():
    """A misspelt diffusers backend (like `_flash_3_varlen` for `_flash_varlen_3`) fails here, not on a GPU."""
    names = {b.value for b in attention_dispatch.AttentionBackendName}
    for dense, padded in PLANS.values():
        assert {dense, padded} <= names | set(VARLEN_KERNELS)
    assert set(PLANS) | set(ALIASES) <= names and set(ALIASES.values()) <= set(PLANS)


def test_unknown_or_unavailable_backends_are_refused_by_name():
    with pytest.raises(ValueError, match=r"model.attention_backend='sage' is not offered; use one of"):
        attention_plan("sage")
    if not attention_dispatch._CAN_USE_FLASH_ATTN:
        with pytest.raises(ImportError, match=r"model.attention_backend='flash_varlen' needs the flash-attn package"):
            attention_plan("flash_varlen")


# -- the attention layer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", OFFERED)
def test_joint_attention_hides_text_padding_anywhere(exact_kernels, backend):
    """Each sample of a padded batch gets, forward and backward, what it gets alone from its visible tokens;
    hidden keys get no gradient (nothing attends to them). Text: none hidden, right-padded, holes."""
    plan = attention_plan(backend)
    text, image = 7, 10
    visible = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, text + image, 2, 16, generator=g).requires_grad_() for _ in range(3))
    weights = torch.randn(3, text + image, 2, 16, generator=g)
    keep = torch.cat([visible, torch.ones(3, image, dtype=torch.bool)], dim=1)
    out = joint_attention(plan, q, k, v, visible, padded=True)
    (out * weights * keep[..., None, None]).sum().backward()
    for i in range(3):
        rows, hidden = keep[i].nonzero().squeeze(1), (~keep[i]).nonzero().squeeze(1)
        alone_qkv = [x.detach()[i, rows][None].requires_grad_() for x in (q, k, v)]
        alone = joint_attention(plan, *alone_qkv, torch.ones(1, int(visible[i].sum()), dtype=torch.bool), False)
        (alone * weights[i, rows]).sum().backward()
        torch.testing.assert_close(out[i, rows], alone[0])
        for batched, single in zip((q, k, v), alone_qkv):
            torch.testing.assert_close(batched.grad[i, rows], single.grad[0])
        assert not k.grad[i, hidden].any() and not v.grad[i, hidden].any()


# -- the whole editor ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", OFFERED)
def test_editor_padded_batch_equals_each_sample_alone(exact_kernels, tiny_model_cfg, backend):
    """Through the tiny editor (source + a smaller reference image, text padded in the middle of the joint
    sequence): each sample's output and the parameter gradients of its loss, in the batch and alone."""
    editor = tiny_editor(tiny_model_cfg, backend)
    params = [p for p in editor.parameters() if p.requires_grad]
    torch.manual_seed(0)
    rows = [torch.randn(n, QWEN_DIM) for n in (3, 9, 6)]
    states, mask = pad_states(rows)
    noisy, sources = torch.randn(3, 16, 4, 6), [torch.randn(3, 16, 4, 6), torch.randn(3, 16, 2, 4)]
    sigma, guidance, weights = torch.rand(3), torch.full((3,), 2.5), torch.randn(3, 16, 4, 6)
    out = editor(noisy, sources, states, mask, sigma, guidance, padded=True)
    for i, row in enumerate(rows):
        batched = torch.autograd.grad((out[i] * weights[i]).sum(), params, retain_graph=True, allow_unused=True)
        alone = editor(noisy[i:i + 1], [s[i:i + 1] for s in sources], row[None], torch.ones(1, len(row), dtype=bool),
                       sigma[i:i + 1], guidance[i:i + 1], padded=False)
        torch.testing.assert_close(out[i], alone[0], rtol=1e-5, atol=1e-5)
        _assert_grads_equal(batched, torch.autograd.grad((alone[0] * weights[i]).sum(), params, allow_unused=True))


@pytest.mark.parametrize("backend", OFFERED)
def test_sampler_cfg_branches_equal_each_branch_alone(exact_kernels, tiny_model_cfg, tiny_models, backend):
    """Two-scale CFG pads the [full, image-only, none] branches to one length: each branch's velocity equals
    the one it gets unpadded, alone, and the sampler's edit of a sample does not depend on its batch."""
    editor = tiny_editor(tiny_model_cfg, backend).eval()
    pipe = EditPipeline(editor, tiny_models.conditioner, tiny_models.codec, tiny_models.scheduler, guidance=1.0)
    edits = [make_edit(i, seed=5) for i in range(2)]
    images, instructions = [e.source for e in edits], [e.instruction for e in edits]
    embeds, pooled, mask, branches, padded = pipe._conditioning(images, instructions, 2.0, 1.5)
    assert branches == 3 and padded and not mask.all()
    torch.manual_seed(0)
    noise = torch.randn(2, 16, 8, 8)
    source = pipe.codec.encode(torch.stack([torch.randn(3, 64, 64).clamp(-1, 1)] * 2))
    rows = 2 * branches
    sigma, guidance = torch.full((rows,), 0.6), torch.full((rows,), 2.5)
    with torch.no_grad():
        v = editor.denoise(noise.repeat(branches, 1, 1, 1), [source.repeat(branches, 1, 1, 1)], embeds, pooled,
                           mask, sigma, guidance, padded)
        for r in range(rows):
            n = int(mask[r].sum())  # its visible text is a prefix
            alone = editor.denoise(noise[r % 2][None], [source[r % 2][None]], embeds[r:r + 1, :n], pooled[r:r + 1],
                                   mask[r:r + 1, :n], sigma[:1], guidance[:1], False)
            torch.testing.assert_close(v[r], alone[0], rtol=1e-5, atol=1e-5)
        batch = pipe.sample(noise, [source], embeds, pooled, mask, 2, 2.5, branches, 2.0, 1.5, padded=padded)
        for i in range(2):
            *conditioning, alone_branches, alone_padded = pipe._conditioning(images[i:i + 1], instructions[i:i + 1],
                                                                            2.0, 1.5)
            alone = pipe.sample(noise[i:i + 1], [source[i:i + 1]], *conditioning, 2, 2.5, alone_branches, 2.0, 1.5,
                                padded=alone_padded)
            torch.testing.assert_close(batch[i], alone[0], rtol=1e-5, atol=1e-5)


# -- the start-up probe -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", OFFERED + sorted(ALIASES))
def test_probe_passes_every_offered_backend_with_exact_kernels(exact_kernels, tiny_model_cfg, backend):
    check_attention_backend(tiny_editor(tiny_model_cfg, backend), "cpu", torch.float32)


def test_probe_refuses_a_varlen_kernel_that_attends_to_padding(exact_kernels, monkeypatch, tiny_model_cfg):
    def leaky(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **_):
        """A build that ignores the segments within a sample: every query sees the sample's whole sequence."""
        whole = torch.arange(0, q.shape[0] + 1, max_seqlen_q, dtype=torch.int32)
        return flash_attn_varlen_func(q, k, v, whole, whole, max_seqlen_q, max_seqlen_k)

    editor = tiny_editor(tiny_model_cfg, "flash")
    monkeypatch.setattr(attention_dispatch, "flash_attn_varlen_func", leaky)
    with pytest.raises(RuntimeError, match=r"model.attention_backend='flash': the 'varlen:flash_attn' kernel \(used "
                                           r"for padded batches\) disagrees with the masked native kernel"):
        check_attention_backend(editor, "cpu", torch.float32)


def test_probe_refuses_diffusers_prefix_varlen_on_the_joint_sequence(exact_kernels):
    """The bug this guards against: diffusers' `flash_varlen` keeps each sample's first sum(mask) keys, so on
    FLUX's [text | padding | images] it attends to the padding and drops the last image tokens."""
    editor = SimpleNamespace(attention_backend=AttentionPlan("flash", "flash", "flash_varlen"))
    with pytest.raises(RuntimeError, match=r"'flash_varlen' kernel \(used for padded batches\) disagrees"):
        check_attention_backend(editor, "cpu", torch.float32)


# -- fewer padded batches -----------------------------------------------------------------------------------
def test_conditioning_is_padded_visibly_to_its_own_bucket():
    _, mask = pad_states([torch.zeros(n, 1) for n in (5, 7, 12)])
    visible = visible_text(mask, 8)
    assert visible.shape == (3, 16) and visible.sum(1).tolist() == [8, 8, 16]
    assert torch.equal(visible[:, :8], torch.ones(3, 8, dtype=torch.bool))  # a prefix: the bucket
    assert torch.equal(visible_text(mask, 1), mask)
    assert not text_padded([5, 7], 8) and text_padded([5, 12], 8) and text_padded([5, 7], 1)


@pytest.mark.parametrize("lengths", [(5, 7), (5, 12)])
def test_a_sample_output_does_not_depend_on_its_batch_with_text_buckets(tiny_model_cfg, lengths):
    """Lengths of one bucket make a batch that needs no mask; of two buckets, a padded one: either way each
    sample's output is the one it gets alone."""
    editor = tiny_editor(tiny_model_cfg, "native", text_pad_multiple=8).eval()
    torch.manual_seed(0)
    rows = [torch.randn(n, QWEN_DIM) for n in lengths]
    states, mask = pad_states(rows)
    padded = text_padded(lengths, 8)
    assert padded == (not editor.condition(states, mask)[2].all())
    noisy, source, sigma, guidance = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.rand(2), torch.ones(2)
    with torch.no_grad():
        batched = editor(noisy, source, states, mask, sigma, guidance, padded)
        for i, row in enumerate(rows):
            alone = editor(noisy[i:i + 1], source[i:i + 1], row[None], torch.ones(1, len(row), dtype=bool),
                           sigma[i:i + 1], guidance[i:i + 1], False)
            torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-5)


def test_frozen_encoder_knows_on_the_cpu_which_batches_need_a_mask():
    sample = lambda n: EncodedSample(f"k{n}", "shard", {"target": torch.zeros(16, 4, 4),
                                                             "states": torch.zeros(n, QWEN_DIM)})
    encoder = FrozenEncoder(None, None, text_pad_multiple=8)
    for lengths, padded in (((5, 7), False), ((5, 12), True)):
        batch = EncodedBatch([f"k{n}" for n in lengths], [sample(n) for n in lengths])
        assert encoder(batch, "cpu")[4] is padded


def test_sequence_length_counts_what_qwen_returns(tiny_models):
    cond = tiny_models.conditioner
    edits = [make_edit(i, seed=2) for i in range(3)]
    images = [edits[0].source, edits[1].source.resize((96, 48)), None]
    _, mask = cond.encode(images, [e.instruction for e in edits])
    sizes = [None if im is None else im.size for im in images]
    assert mask.sum(1).tolist() == [cond.sequence_length(e.instruction, s) for e, s in zip(edits, sizes)]


def test_stream_groups_batches_by_text_bucket(tmp_path, tiny_models):
    urls = shard_urls(write_toy_shards(tmp_path / "toy", num=96, seed=0, samples_per_shard=48, progress=False))
    length = lambda raw: tiny_models.conditioner.sequence_length(json.loads(raw["json"])["instruction"], (64, 64))

    def padded_share(text_key):
        stream = BucketStream([ShardSet("toy", urls)], 8, shuffle_buffer=16, bucket_base=64, text_key=text_key)
        batches = list(itertools.islice(stream._batches_of_raw(0, 1), 20))
        return sum(text_padded([length(r) for r in raws], 8) for raws in batches) / len(batches)

    assert padded_share(None) > 0.5  # toy instructions span several 8-token buckets
    assert padded_share(TextBucketKey(8, tiny_models.conditioner.sequence_length)) == 0
