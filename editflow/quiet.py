"""Keep library notices that a user cannot act on off the terminal, each by its logger and message.

Nothing is silenced wholesale: only the records listed here are dropped, at the logger that creates
them, so every other warning of the same library still reaches the user. Call `install()` before the
libraries are imported (the notices are emitted at import time).
"""

from __future__ import annotations

import logging

# (logger, fragments that must all appear in the message), and why the notice says nothing to a user:
NOTICES = (
    # torchao probes its optional CUDA/cutlass kernels at import; a CPU machine or another torch build cannot use them
    ("torchao", ("Failed to load", "torchao/_C")),
    # torchao registers its enums with torch's pytree API; the deprecation is addressed to torchao's authors
    ("torch.utils._pytree", ("is an Enum subclass and is now natively supported",)),
    # diffusers' torchao checkpoint support, for checkpoints serialised with torchao (editflow never writes them)
    ("diffusers.quantizers.torchao.torchao_quantizer", ("Unable to import `torchao` Tensor objects",)),
    # editflow uses the PIL image processors on purpose: torchvision breaks the CPU install (see README)
    ("transformers.utils.import_utils", ("requires torchvision (not installed)",)),
    # DeepSpeed's accelerator probe on a CPU machine; the run's own log says where it runs
    ("DeepSpeed", ("Setting accelerator to CPU",)),
    # `editflow export` leaves Kontext's T5/CLIP slots empty on purpose (Qwen and the connector condition);
    # a component that is there and cannot be saved still warns
    ("diffusers.pipelines.pipeline_utils", ("=None of type <class 'NoneType'> cannot be saved",)),
)


class DropNotices(logging.Filter):
    """Drops the records whose message contains every fragment of one of `patterns`."""

    def __init__(self, patterns: list[tuple[str, ...]]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(all(fragment in message for fragment in pattern) for pattern in self.patterns)


def install() -> None:
    """Attach the filters (once per process; safe to call again)."""
    by_logger: dict[str, list[tuple[str, ...]]] = {}
    for name, fragments in NOTICES:
        by_logger.setdefault(name, []).append(fragments)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNotices) for f in logger.filters):
            logger.addFilter(DropNotices(patterns))
