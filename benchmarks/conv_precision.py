"""bf16 autocast vs fp32: one training step of several timm architectures on this CPU.

    .venv/bin/python benchmarks/conv_precision.py [--size 64] [--batch-size 32]

Random-init models (nothing downloaded), random images, cross-entropy, backward, fused
AdamW; fp32 and bf16 alternate three times, three steps each, the best step of each kept.
The evidence behind ``train.precision: auto`` keeping models with depthwise convolutions in
fp32 on CPU (``tuneforge.engine.precision.has_depthwise_conv``); see PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import time

import torch

ARCHS = ["efficientnet_lite0", "mobilenetv3_small_100", "convnext_atto", "resnet18", "vit_tiny_patch16_224"]


def step_ms(name: str, size: int, batch: int) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, pretrained=False)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    best: dict = {}
    for mode in ["fp32", "bf16"] * 3:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16")
        for i in range(3):
            t0 = time.perf_counter()
            with ctx:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i:  # the first step of each block warms up
                best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - t0)
    return {k: round(v * 1e3) for k, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image size for the CNNs (ViT runs at 224)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--archs", default=",".join(ARCHS))
    a = ap.parse_args()
    print(f"{torch.get_num_threads()} threads; best training step in ms")
    for name in a.archs.split(","):
        size = 224 if name.startswith("vit") else a.size
        ms = step_ms(name, size, a.batch_size)
        print(f"  {name:24s} {size:3d}px  fp32 {ms['fp32']:5d}  bf16 {ms['bf16']:5d}  bf16/fp32 {ms['bf16'] / ms['fp32']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
