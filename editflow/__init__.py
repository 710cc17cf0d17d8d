"""editflow: a rectified-flow trainer for instruction-based image editing (FLUX.1-Kontext + Qwen2.5-VL)."""

__version__ = "0.1.0"
