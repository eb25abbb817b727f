"""The options of `carebench synth` and their defaults, written once (the CLI and `simulator.synthesize` read
them), kept apart from the simulator so the command line can show them without importing it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SynthOptions:
    image_size: int = 512  # side in pixels of the rendered radiographs
    cxr_rate: float = 0.3  # share of stays with a frontal X-ray in the first 48 h
    workers: int = 2  # worker processes (the output does not depend on them)


SYNTH = SynthOptions()
