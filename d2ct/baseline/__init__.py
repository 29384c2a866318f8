"""The organisers' classical baseline (median, Sobel, markers, watershed) with CLAHE / bilateral /
total-variation preprocessing presets."""
from d2ct.baseline.watershed import (
    PRESETS,
    BaselineConfig,
    get_preset,
    preprocess,
    relabel_uint8,
    run_baseline,
    segment_files,
    segment_slice,
)

__all__ = ["PRESETS", "BaselineConfig", "get_preset", "preprocess", "relabel_uint8", "run_baseline",
           "segment_files", "segment_slice"]
