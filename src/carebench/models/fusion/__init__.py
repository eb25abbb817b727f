"""Fusion methods, one module per method, named as the method is known in the literature."""

from carebench.models.fusion import aug, daft, drfuse, inforeg, latefusion, medfuse, mmtm, utde

__all__ = ["aug", "daft", "drfuse", "inforeg", "latefusion", "medfuse", "mmtm", "utde"]
