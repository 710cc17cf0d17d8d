"""A deeper FLUX transformer grown from a trained one, computing exactly the same function at the start.

Each new block is a copy of a trained block of its kind (double- or single-stream, cycling from the last
one back) with its AdaLN-Zero gates (the rows of `norm*.linear` that scale each residual branch) set to
zero, so it adds nothing until training opens the gates — DiT's adaLN-Zero start, applied to blocks that
already compute something useful rather than random ones. New double blocks go after the trained double
blocks, new single blocks after the trained single blocks.

    python -m editflow.models.deepen EXPORT_OR_TRANSFORMER_DIR OUT --num-single-layers 4 [--num-layers 3]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported where a model is loaded, after main() has kept diffusers' import notices quiet
    from diffusers import FluxTransformer2DModel

# Which chunks of each AdaLN linear's output are gates: AdaLayerNormZero gives (shift, scale, gate) for the
# attention then for the MLP; AdaLayerNormZeroSingle one (shift, scale, gate) for the fused block.
_DOUBLE_CHUNKS, _DOUBLE_GATES = 6, (2, 5)
_SINGLE_CHUNKS, _SINGLE_GATES = 3, (2,)


def _close_gates(linear: torch.nn.Linear, chunks: int, gates: tuple[int, ...]) -> None:
    size = linear.out_features // chunks
    with torch.no_grad():
        for index in gates:
            linear.weight[index * size : (index + 1) * size].zero_()
            linear.bias[index * size : (index + 1) * size].zero_()


def _grown(blocks: torch.nn.ModuleList, total: int, gate_norms: tuple[str, ...], chunks: int,
           gates: tuple[int, ...]) -> torch.nn.ModuleList:
    trained = list(blocks)
    if total < len(trained):
        raise ValueError(f"cannot shrink {len(trained)} blocks to {total}: deepen only adds blocks")
    if not trained and total:
        raise ValueError("no trained block of this kind to copy")
    new = []
    for index in range(total - len(trained)):
        block = copy.deepcopy(trained[-1 - index % len(trained)])
        for name in gate_norms:
            _close_gates(getattr(block, name).linear, chunks, gates)
        new.append(block)
    return torch.nn.ModuleList(trained + new)


def deepen(model: FluxTransformer2DModel, num_layers: int | None = None,
           num_single_layers: int | None = None) -> FluxTransformer2DModel:
    """`model` with `num_layers` double-stream and `num_single_layers` single-stream blocks (None: as it is);
    its output is unchanged until the new blocks' gates train open. Modifies and returns `model`."""
    num_layers = len(model.transformer_blocks) if num_layers is None else num_layers
    num_single_layers = len(model.single_transformer_blocks) if num_single_layers is None else num_single_layers
    model.transformer_blocks = _grown(model.transformer_blocks, num_layers, ("norm1", "norm1_context"),
                                      _DOUBLE_CHUNKS, _DOUBLE_GATES)
    model.single_transformer_blocks = _grown(model.single_transformer_blocks, num_single_layers, ("norm",),
                                             _SINGLE_CHUNKS, _SINGLE_GATES)
    model.register_to_config(num_layers=num_layers, num_single_layers=num_single_layers)
    return model


def _load(path: Path) -> FluxTransformer2DModel:
    """A transformer directory, or an export / pipeline directory with a `transformer/` subfolder."""
    from diffusers import FluxTransformer2DModel

    if (path / "config.json").is_file():
        return FluxTransformer2DModel.from_pretrained(path)
    if (path / "transformer" / "config.json").is_file():
        return FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    raise SystemExit(f"{path}: no FLUX transformer here (neither config.json nor transformer/config.json)")


def main(argv: list[str] | None = None) -> None:
    from editflow import quiet

    quiet.install()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a transformer directory, or an export with transformer/")
    parser.add_argument("out", type=Path, help="where the deeper transformer is saved (save_pretrained)")
    parser.add_argument("--num-layers", type=int, default=None, help="double-stream blocks (default: as is)")
    parser.add_argument("--num-single-layers", type=int, default=None, help="single-stream blocks (default: as is)")
    args = parser.parse_args(argv)
    model = _load(args.source)
    before = (len(model.transformer_blocks), len(model.single_transformer_blocks))
    try:
        deepen(model, args.num_layers, args.num_single_layers)
    except ValueError as err:
        raise SystemExit(f"{args.source}: {err}") from err
    model.save_pretrained(args.out)
    after = (len(model.transformer_blocks), len(model.single_transformer_blocks))
    note = "the new blocks' gates are closed: same output until they train" if after != before else "no block added"
    print(f"{args.source}: {before[0]} + {before[1]} blocks -> {after[0]} + {after[1]}, saved to {args.out} ({note})")


if __name__ == "__main__":
    main()
