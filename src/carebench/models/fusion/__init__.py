"""Fusion methods, one module per method, named as the method is known in the literature."""

from carebench.models.fusion import aug, drfuse, inforeg, latefusion, medfuse, utde

__all__ = ["aug", "drfuse", "inforeg", "latefusion", "medfuse", "utde"]
