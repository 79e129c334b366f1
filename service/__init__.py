"""ls-autoseg: automatic segmentation pre-annotation for Label Studio."""

from __future__ import annotations

__version__ = "0.1.0"
