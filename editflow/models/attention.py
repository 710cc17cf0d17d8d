"""Attention over FLUX's joint sequence that never attends to padding, on every attention backend.

FLUX attends over one joint sequence per sample, `[text | target | source | references]`; only the text can
be padded (all images of a batch share their bucket), so a padded batch hides some text tokens of some
samples, in the middle of the joint sequence.

How padded batches run (the design, and why it is the fastest on a GPU):

- FlashAttention kernels (flash-attn's FA2 and FA3, PyTorch's built-in FA2) take no mask. Their varlen entry
  points take segment boundaries (`cu_seqlens`) in a flattened (B*L) token sequence and attend within each
  segment. diffusers' own varlen backends turn a mask into lengths and keep each sample's *first* sum(mask)
  keys, which is wrong here (the padding sits between the text and the images).
- So the editor moves each sample's hidden text tokens in front of its visible ones, plus one hidden token in
  front of every sample. This is exact: FLUX gives every text token the same rotary position (0, 0, 0), so
  the order of text tokens is free. It gathers only the text embeddings (B, T, 3072), once per forward.
- The flattened batch is then a view (no copy) in which every sample is `[hidden | visible]`: the kernel gets
  2B segments; hidden tokens attend among themselves (their outputs are never read), visible tokens among
  themselves. The extra hidden token keeps every segment non-empty (empty varlen segments break some
  FlashAttention builds: Dao-AILab/flash-attention#1537, #2562).
- Against the usual alternative, gathering valid tokens into a packed buffer and scattering the output back
  (flash-attn's `unpad_input`/`pad_input`, transformers' padded FA2), this moves no activations: that
  gather/scatter reads and writes q, k, v and the output once more per attention call, forward, backward and
  checkpoint recompute (~1.5 GB per sample and layer at 1024^2 Kontext, ~1 ms of an A100's bandwidth against
  ~20 ms of attention), and finding the valid indices costs a host sync. Here the boundaries are computed on
  the device and `max_seqlen` is bounded by L, so nothing waits for the GPU, and the kernel does the FLOPs of
  the visible tokens plus the tiny hidden-by-hidden blocks: cheaper than the unpadded batch.
- Kernels that take a mask (SDPA's math/mem-efficient kernels: `native`, `_native_efficient`) get a boolean
  key mask over the joint sequence in its original order; PyTorch's built-in FA2 (`_native_flash`,
  `_native_cudnn`'s padded batches) uses the varlen path when this PyTorch has `torch.nn.attention.varlen`,
  and the masked mem-efficient kernel otherwise.

Batches where nothing is hidden keep diffusers' own processor and backend: no mask, no extra work, no host
sync (the trainer knows on the CPU whether a batch is padded). Exception: diffusers' fixed-length FA3 op has
no backward, so FA3 batches always run its varlen kernel (one segment per sample when nothing is padded).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable, NamedTuple

import torch
from diffusers.models import attention_dispatch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _flash_attn_2(q, k, v, cu_seqlens, max_seqlen):
    return attention_dispatch.flash_attn_varlen_func(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen)


def _flash_attn_3(q, k, v, cu_seqlens, max_seqlen):
    out = attention_dispatch.flash_attn_3_varlen_func(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen)
    return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the log-sum-exp


def _torch_flash(q, k, v, cu_seqlens, max_seqlen):
    from torch.nn.attention import varlen

    return varlen.varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


# Varlen kernels (segment boundaries instead of a mask), by the name a plan uses for them.
VARLEN_KERNELS: dict[str, VarlenKernel] = {
    "varlen:flash_attn": _flash_attn_2, "varlen:flash_attn_3": _flash_attn_3, "varlen:torch": _torch_flash}


@dataclasses.dataclass
class JointLayout:
    """How one batch's joint attention runs; passed to the attention processors as `attention_mask`.

    Built once per forward, on the device, without a host sync. A varlen layout (`cu_seqlens` set) runs
    `kernel` on segments of the flattened batch, and when it hides text (`text_order` set) the editor must
    feed the text through `arrange_text`; a masked layout runs the diffusers backend `kernel` with `key_mask`.
    """

    kernel: str
    key_mask: torch.Tensor | None = None  # (B, 1, 1, L) bool, True where a key is visible
    cu_seqlens: torch.Tensor | None = None  # (S + 1,) int32 segment starts in the flattened (B * L) sequence
    max_seqlen: int = 0  # a bound on the segment lengths (the kernels size their grids by it)
    text_order: torch.Tensor | None = None  # (B, T): text position -> source index, hidden tokens first

    def arrange_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) text tokens -> the layout's order: one hidden (zero) token, the hidden ones, the rest."""
        if self.text_order is None:
            return text
        index = self.text_order.view(*self.text_order.shape, *[1] * (text.dim() - 2)).expand_as(text)
        return torch.cat([text.new_zeros(text[:, :1].shape), text.gather(1, index)], dim=1)

    def restore_text(self, text: torch.Tensor) -> torch.Tensor:
        """The inverse of `arrange_text` (for the start-up probe and the tests)."""
        if self.text_order is None:
            return text
        text = text[:, 1:]
        index = self.text_order.view(*self.text_order.shape, *[1] * (text.dim() - 2)).expand_as(text)
        return torch.empty_like(text).scatter(1, index, text)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(B, L, H, D) query, key, value -> (B, L, H, D) attention output."""
        if self.cu_seqlens is None:
            backend = attention_dispatch.AttentionBackendName(self.kernel)
            return attention_dispatch.dispatch_attention_fn(query, key, value, attn_mask=self.key_mask, backend=backend)
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # a view of the contiguous (B, L, H, D) projections
        out = VARLEN_KERNELS[self.kernel](flat(query), flat(key), flat(value), self.cu_seqlens, self.max_seqlen)
        return out.view(query.shape)


def masked_layout(kernel: str, text_visible: torch.Tensor, image_tokens: int) -> JointLayout:
    """A boolean key mask over the joint sequence in its own order."""
    image = text_visible.new_ones(text_visible.shape[0], image_tokens)
    return JointLayout(kernel, key_mask=torch.cat([text_visible, image], dim=1)[:, None, None, :])


def segment_layout(kernel: str, text_visible: torch.Tensor, image_tokens: int) -> JointLayout:
    """Hidden text first (plus one hidden token), then one segment of the visible text and the images."""
    batch, text = text_visible.shape
    visible = text_visible.sum(1, dtype=torch.int32)
    lengths = torch.stack([text + 1 - visible, visible + image_tokens], dim=1).flatten()
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    order = torch.argsort(text_visible.to(torch.uint8), dim=1, stable=True)  # hidden (0) first, order kept
    return JointLayout(kernel, cu_seqlens=cu_seqlens, max_seqlen=text + 1 + image_tokens, text_order=order)


def uniform_layout(kernel: str, batch: int, length: int, device) -> JointLayout:
    """One segment per sample: a varlen kernel on a batch where nothing is hidden."""
    cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    return JointLayout(kernel, cu_seqlens=cu_seqlens, max_seqlen=length)


class AttentionPlan(NamedTuple):
    """What `model.attention_backend` runs: a kernel for batches where every token is visible (`dense`) and one
    for padded batches; each a diffusers backend name or a `VARLEN_KERNELS` name."""

    name: str  # as configured
    dense: str
    padded: str

    def layout(self, text_visible: torch.Tensor, image_tokens: int, padded: bool) -> JointLayout | None:
        """The batch's layout; None: diffusers' processor with the dense backend and no mask."""
        if not padded:
            if self.dense in VARLEN_KERNELS:
                return uniform_layout(self.dense, text_visible.shape[0], text_visible.shape[1] + image_tokens,
                                      text_visible.device)
            return None
        make = segment_layout if self.padded in VARLEN_KERNELS else masked_layout
        return make(self.padded, text_visible.bool(), image_tokens)


class KontextAttnProcessor(FluxAttnProcessor):
    """diffusers' FLUX attention processor; a batch with a `JointLayout` runs that layout's kernel."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not isinstance(attention_mask, JointLayout):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        # FluxAttnProcessor's steps, with the layout's kernel in place of diffusers' dispatch
        query, key, value, text_query, text_key, text_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))
        query, key, value = attn.norm_q(heads(query)), attn.norm_k(heads(key)), heads(value)
        if attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(heads(text_query)), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(text_key)), key], dim=1)
            value = torch.cat([heads(text_value), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = attention_mask.attend(query, key, value).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text, image = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


# The backends model.attention_backend offers (all can train) -> (dense kernel, padded kernel).
_TORCH_FLASH_PADDED = ("varlen:torch" if importlib.util.find_spec("torch.nn.attention.varlen")
                       else "_native_efficient")
PLANS = {
    "native": ("native", "native"),  # SDPA picks the kernel; padded batches with a boolean mask
    "_native_efficient": ("_native_efficient", "_native_efficient"),
    "_native_flash": ("_native_flash", _TORCH_FLASH_PADDED),
    "_native_cudnn": ("_native_cudnn", _TORCH_FLASH_PADDED),
    "flash": ("flash", "varlen:flash_attn"),
    # diffusers' fixed-length FA3 op (_wrapped_flash_attn_3) registers no backward
    "_flash_3": ("varlen:flash_attn_3", "varlen:flash_attn_3"),
}
# diffusers' own varlen backends keep the first sum(mask) keys, wrong for FLUX's joint sequence: their names
# select the FlashAttention build, whose varlen kernel then runs padded batches as above.
ALIASES = {"flash_varlen": "flash", "_flash_varlen_3": "_flash_3"}


def _missing_package(plan: AttentionPlan) -> str | None:
    kernels = {plan.dense, plan.padded}
    if kernels & {"flash", "varlen:flash_attn"} and not attention_dispatch._CAN_USE_FLASH_ATTN:
        return (f"the flash-attn package (>= {attention_dispatch._REQUIRED_FLASH_VERSION}, importable with this "
                "torch; pip install 'editflow[gpu]')")
    if "varlen:flash_attn_3" in kernels and not attention_dispatch._CAN_USE_FLASH_ATTN_3:
        return "FlashAttention 3 (flash_attn_interface, built from flash-attention's hopper/ directory)"
    return None


def attention_plan(backend: str | None) -> AttentionPlan:
    """The plan for model.attention_backend; refuses a backend that is not offered or whose package is missing."""
    name = backend or "native"
    plan = PLANS.get(ALIASES.get(name, name))
    if plan is None:
        raise ValueError(f"model.attention_backend={name!r} is not offered; use one of {sorted(PLANS)} "
                         f"(or {sorted(ALIASES)}, the same kernels)")
    plan = AttentionPlan(name, *plan)
    missing = _missing_package(plan)
    if missing:
        raise ImportError(f"model.attention_backend={name!r} needs {missing}; '_native_flash' uses PyTorch's "
                          "built-in FlashAttention instead")
    return plan


def install(transformer, plan: AttentionPlan) -> None:
    """Our processor on every attention module of `transformer`, holding the plan's dense backend (set on the
    processor, not with diffusers' set_attention_backend, which also changes the process-wide default).
    Callers that pass no layout (diffusers' FluxKontextPipeline on this transformer) run that backend, or
    diffusers' default where the dense kernel is a varlen one."""
    processor = KontextAttnProcessor()
    if plan.dense not in VARLEN_KERNELS:
        processor._attention_backend = attention_dispatch.AttentionBackendName(plan.dense)
    transformer.set_attn_processor(processor)


def joint_attention(plan: AttentionPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    text_visible: torch.Tensor, padded: bool) -> torch.Tensor:
    """The plan's attention on (B, T + N, H, D) projections of a joint sequence in its own order (T text tokens,
    `text_visible` (B, T), then N image tokens), arranged and restored as the editor does: the attention of a
    batch in isolation, for the start-up probe and the tests."""
    text = text_visible.shape[1]
    layout = plan.layout(text_visible, query.shape[1] - text, padded)
    if layout is None:
        return attention_dispatch.dispatch_attention_fn(
            query, key, value, backend=attention_dispatch.AttentionBackendName(plan.dense))
    arranged = [torch.cat([layout.arrange_text(x[:, :text]), x[:, text:]], dim=1) for x in (query, key, value)]
    out = layout.attend(*arranged)
    text_out = out.shape[1] - (query.shape[1] - text)
    return torch.cat([layout.restore_text(out[:, :text_out]), out[:, text_out:]], dim=1)


def _probe_gap(plan: AttentionPlan, padded: bool, device, dtype) -> float:
    """Largest difference (outputs of visible queries, gradients of q, k, v; relative to their scale) between
    the plan's kernel and the masked native kernel in float32, forward and backward, on a realistic batch:
    sample 0's text fully visible, sample 1's text padded (when `padded`), then image tokens."""
    text, image, heads, head_dim = 8, 24, 2, 64
    visible = torch.ones(2, text, dtype=torch.bool, device=device)
    if padded:
        visible[1, 5:] = False
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(2, text + image, heads, head_dim, generator=g).to(device, dtype).requires_grad_()
           for _ in range(3)]
    keep = torch.cat([visible, visible.new_ones(2, image)], dim=1)[..., None, None]  # queries whose output counts
    weights = torch.randn(2, text + image, heads, head_dim, generator=g).to(device)
    mask = masked_layout("native", visible, image).key_mask

    def run(attend):
        out = attend(*qkv).float()
        grads = torch.autograd.grad((out * weights * keep).sum(), qkv)
        return [out * keep] + [g.float() for g in grads]

    candidate = run(lambda q, k, v: joint_attention(plan, q, k, v, visible, padded))
    reference = run(lambda q, k, v: attention_dispatch.dispatch_attention_fn(
        q.float(), k.float(), v.float(), attn_mask=mask, backend=attention_dispatch.AttentionBackendName.NATIVE))
    relative = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
    return max(relative(a, b) for a, b in zip(candidate, reference))


def check_attention_backend(editor, device, dtype: torch.dtype) -> None:
    """Run both kernels of the editor's plan once, forward and backward, on `device` in `dtype`, on a batch
    with padded text then image tokens, against the masked native kernel: a backend that cannot run there or
    that lets a query see padding is refused now, by name, instead of inside (or silently during) training."""
    plan: AttentionPlan = editor.attention_backend
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # bf16/fp16 kernels against float32
    for padded in (False, True):
        kernel = plan.padded if padded else plan.dense
        what = f"the {kernel!r} kernel{' (used for padded batches)' if padded else ''}"
        try:
            gap = _probe_gap(plan, padded, device, dtype)
        except Exception as err:  # noqa: BLE001 - any kernel failure becomes a config error
            raise RuntimeError(f"model.attention_backend={plan.name!r}: {what} does not run forward and backward "
                               f"on {device} with {dtype}: {err}") from err
        if not gap <= tolerance:
            case, fault = (("a batch whose text is padded before the image tokens", "attends to padding or drops "
                            "visible tokens") if padded else ("an unpadded batch", "computes something else"))
            raise RuntimeError(f"model.attention_backend={plan.name!r}: {what} disagrees with the masked native "
                               f"kernel by {gap:.3g} (relative; tolerance {tolerance:g}) on {case}, forward or "
                               f"backward: on this build it {fault}; use another model.attention_backend (native "
                               f"runs everywhere)")
