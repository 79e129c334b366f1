"""The results stage: masks -> brush RLE -> Label Studio results, checked against the project's
label config. Pure: numpy only, no I/O."""

from __future__ import annotations

from service.results.brush import (
    BrushTarget,
    brush_results,
    build_prediction,
    decode_result,
    resolve_target,
)

__all__ = ["BrushTarget", "brush_results", "build_prediction", "decode_result", "resolve_target"]
