"""Fusion methods, one module per method, named as the method is known in the literature."""

from carebench.models.fusion import drfuse, latefusion, medfuse

__all__ = ["drfuse", "latefusion", "medfuse"]
