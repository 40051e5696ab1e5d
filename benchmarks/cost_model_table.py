#!/usr/bin/env python
"""Print the kernel cost model's PREDICTED microseconds per step over the GPU grid.

These are predictions of ``lstmgru._kernels.cost_model`` (uncalibrated constants from public
figures), not measurements: no GPU has run these kernels yet. The last column is cuDNN's one
published point (FlashRNN's plot: H100, LSTM fp16, B=16, T=1024, H=768: 2.01 ms forward, about
1.96 us per step), for scale.

    python benchmarks/cost_model_table.py [--sms 132] > benchmarks/results/cost-model-predictions.md
"""
import argparse

import torch

from lstmgru._kernels import cost_model

CUDNN_PUBLISHED_US = {("lstm", 16, 768, "float16"): 2.01e3 / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sms", type=int, default=132, help="SM count (H100 SXM / H200: 132)")
    args = p.parse_args()
    print(f"# Cost model: PREDICTED us per step ({args.sms} SMs; uncalibrated, not measured)\n")
    print("| cell | dtype | B | H | tiled (predicted) | split (predicted) | picks | "
          "cuDNN published |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for cell in ("lstm", "gru"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = str(dtype).replace("torch.", "")
            for B in (1, 16, 64, 256):
                for H in (128, 256, 512, 768, 1024):
                    tiled = cost_model.tiled_step_us(cell, B, H, dtype, args.sms)
                    split = cost_model.split_step_us(cell, B, H, dtype, args.sms)
                    pick = cost_model.choose(cell, B, H, dtype, args.sms)
                    published = CUDNN_PUBLISHED_US.get((cell, B, H, name))
                    split_cell = "no layout" if split == float("inf") else f"{split:.2f}"
                    print(f"| {cell} | {name} | {B} | {H} | {tiled:.2f} | {split_cell} | {pick} | "
                          f"{'' if published is None else f'{published:.2f}'} |")


if __name__ == "__main__":
    main()
