"""Does a model read its inputs? The flow loss on held-out edits with each sample's own instruction and
source, then with another sample's instruction, then with another sample's source image.

A kind of edit whose loss barely moves when its instruction is swapped (ratio near 1) is done without
reading the instruction: the model copies or guesses. A ratio well above 1 says the instruction steers the
prediction. The Kontext source tokens get the same test. Noise, noise levels and the swap partner are fixed,
so two models (or two checkpoints of one run) are scored on the same draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from editflow import flow
from editflow.data.buckets import nearest_bucket
from editflow.data.images import to_rgb
from editflow.data.pixels import image_tensor
from editflow.data.samples import EditSample
from editflow.errors import EditflowError
from editflow.evaluation import aggregate

SIGMAS = (0.3, 0.6, 0.9)  # the content of an edit is decided at mid to high noise
INPUTS = ("own", "other_instruction", "other_source")


def swap_groups(samples: Sequence[EditSample], base: int) -> tuple[dict[tuple, list[int]], int]:
    """({(bucket, kind): indices of the samples with a source that share them}, how many samples have no
    partner); an EditflowError when no sample has one, so a caller can check before any model loads."""
    groups: dict[tuple, list[int]] = {}
    for i, sample in enumerate(samples):
        if sample.source is not None:
            groups.setdefault((nearest_bucket(*sample.source.size, base), _task(sample)), []).append(i)
    paired = {key: indices for key, indices in groups.items() if len(indices) > 1}
    if not paired:
        raise EditflowError(f"no two of the {len(samples)} samples with a source share a size bucket (base {base}) "
                            "and a kind of edit (json.task): the instruction and source swaps need such a partner")
    return paired, sum(len(v) for v in groups.values()) - sum(len(v) for v in paired.values())


def _task(sample: EditSample) -> str:
    return sample.meta.get("task") or "edit"


def _fit(image, size: tuple[int, int]):
    """RGB at the bucket's size, resized as the sampler resizes a source."""
    image = to_rgb(image)
    return image if image.size == size else image.resize(size, Image.BICUBIC)


@torch.no_grad()
def _losses(pipe, own: list[EditSample], other: list[EditSample], size, guidance: float, seed: int):
    """(len(own), 3) flow losses, averaged over SIGMAS: own inputs, the partner's instruction, its source."""
    device = pipe.device
    latents = lambda images: pipe.codec.encode(torch.stack([image_tensor(im) for im in images])).to(device)
    images = [_fit(s.source, size) for s in own]  # what Qwen sees: this sample's source, either way
    x0 = latents([_fit(s.target, size) for s in own]).float()
    sources, swapped = latents(images), latents([_fit(s.source, size) for s in other])
    conditions = [pipe.encode(images, [s.instruction for s in own]),
                  pipe.encode(images, [s.instruction for s in other])]
    runs = [(conditions[0], sources), (conditions[1], sources), (conditions[0], swapped)]
    generator = torch.Generator().manual_seed(seed)
    totals = torch.zeros(len(own), len(runs))
    guide = torch.full((len(own),), guidance, device=device)
    for sigma in SIGMAS:
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigmas = torch.full((len(own),), sigma, device=device)
        noisy = flow.add_noise(x0, noise, sigmas)
        for j, ((embeds, pooled, mask), source) in enumerate(runs):
            pred = pipe.editor.denoise(noisy, [source], embeds, pooled, mask, sigmas, guide)
            totals[:, j] += flow.per_sample_mse(pred, flow.velocity(x0, noise)).cpu()
    return totals / len(SIGMAS)


def conditioning_reliance(pipe, samples: Sequence[EditSample], base: int, guidance: float, seed: int = 0,
                          batch_size: int = 8) -> dict:
    """Flow losses per kind of edit with own and swapped inputs, and their ratios (see the module doc).

    Each sample's partner (whose instruction and source are swapped in) is the next sample of the same kind of
    edit and size bucket: a swap then asks whether the model reads what this instruction says (which object,
    colour, place), not only which kind of edit it names. A sample with no partner is left out and counted."""
    groups, left_out = swap_groups(samples, base)
    rows = []
    for ((width, height), task), indices in groups.items():
        partners = indices[1:] + indices[:1]
        for start in range(0, len(indices), batch_size):
            own = [samples[i] for i in indices[start:start + batch_size]]
            other = [samples[i] for i in partners[start:start + batch_size]]
            losses = _losses(pipe, own, other, (width, height), guidance, seed + start)
            rows += [(task, dict(zip(INPUTS, map(float, row)))) for row in losses]
    losses = aggregate(rows)
    ratios = {}
    for name, value in losses.items():  # "other_source" or "other_source/add" over "own" or "own/add"
        swap, slash, kind = name.partition("/")
        if swap != "own":
            own = losses["own" + slash + kind]
            ratios[name] = value / own if own else float("nan")
    return {"sigmas": list(SIGMAS), "num_samples": len(rows), "left_out": left_out, "loss": losses,
            "ratio": ratios}


def reliance_table(result: dict) -> str:
    """The per-kind table `editflow eval --reliance` prints."""
    loss, ratio = result["loss"], result["ratio"]
    kinds = sorted({k.split("/", 1)[1] for k in loss if "/" in k})
    lines = [f"flow loss with each sample's own inputs, then with another sample's (noise levels "
             f"{', '.join(map(str, result['sigmas']))}; {result['num_samples']} samples); a ratio near 1: "
             "the model does not read that input",
             f"{'kind':<12}{'own':>8}{'other instruction':>22}{'other source':>20}"]
    for kind in kinds + [None]:
        key = lambda name: name if kind is None else f"{name}/{kind}"
        lines.append(f"{kind or 'all':<12}{loss[key('own')]:>8.4f}"
                     f"{loss[key('other_instruction')]:>13.4f} ({ratio[key('other_instruction')]:>4.2f}x)"
                     f"{loss[key('other_source')]:>11.4f} ({ratio[key('other_source')]:>4.2f}x)")
    return "\n".join(lines)
