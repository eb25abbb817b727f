"""Does `torch.compile` speed up the image encoder's training step? ResNet-50 (the encoder of the plain ResNet-50
methods), one training step = forward, loss, backward and a fused AdamW step, in carebench's default CPU
settings (bfloat16 autocast, channels-last), eager against compiled, alternating in one process so both see the
same machine.

    python benchmarks/compile_step.py [--threads 1] [--batch 16] [--size 224] [--steps 7] [--dynamic]

Prints the first compiled step (compile time included; inductor's cache on disk shortens a repeat), the median
step of each, and their ratio. `--dynamic` compiles with dynamic shapes and also times batches of other sizes
(the number of stays with an X-ray varies from batch to batch, so a static compile would recompile per size).
"""

from __future__ import annotations

import os.path
import sys

if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import argparse
import json
import platform
import statistics
import time

import torch
import torchvision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=7, help="timed steps of each (after one warm-up step)")
    ap.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=25).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    compiled = torch.compile(model, dynamic=args.dynamic)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 3, args.size, args.size).to(memory_format=torch.channels_last)
        return x, torch.rand(n, 25)

    def step(net, x, y) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    x, y = batch(args.batch)
    first = step(compiled, x, y)
    step(model, x, y)
    eager, comp = [], []
    for _ in range(args.steps):
        eager.append(step(model, x, y))
        comp.append(step(compiled, x, y))
    other = {}
    if args.dynamic:  # other batch sizes: no recompile expected with dynamic shapes
        for n in (args.batch // 3, args.batch - 1):
            xo, yo = batch(n)
            other[n] = round(step(compiled, xo, yo), 2)
    print(
        json.dumps(
            {
                "threads": args.threads,
                "batch": args.batch,
                "size": args.size,
                "dynamic": args.dynamic,
                "first_compiled_step_s": round(first, 1),
                "eager_median_s": round(statistics.median(eager), 3),
                "compiled_median_s": round(statistics.median(comp), 3),
                "eager_over_compiled": round(statistics.median(eager) / statistics.median(comp), 2),
                "compiled_other_batch_sizes_s": other,
                "torch": torch.__version__,
                "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
            }
        )
    )


if __name__ == "__main__":
    main()
