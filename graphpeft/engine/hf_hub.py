"""Whether the Hugging Face hub may be contacted: the one switch every loader here reads."""

from __future__ import annotations

import os


def offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a transformers dependency
        return False
    return bool(constants.HF_HUB_OFFLINE)
