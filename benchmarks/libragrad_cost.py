"""Cost of LibraGrad: one gradient pass (forward + backward to r_0) plain vs under `libragrad(model)`.

Interleaved runs (plain, LibraGrad, plain, ...), best of N each, one process; prints the ratio.

    .venv/bin/python benchmarks/libragrad_cost.py                       # FashionGrid ViT on the CPU
    .venv/bin/python benchmarks/libragrad_cost.py --model vit_base_patch16_224 --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from caap.methods.libragrad import libragrad
from caap.models.build import build_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_fashiongrid_patch7_56")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20, help="timed passes of each kind (best is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model).to(device)
    size = model.model.patch_embed.img_size
    images = torch.rand(args.batch, 3, *size, device=device)
    target = torch.zeros(args.batch, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def grad_pass(rewired: bool) -> float:
        with torch.no_grad():
            r0 = model.embed(images)
        r0.requires_grad_(True)
        sync()
        start = time.perf_counter()
        with torch.enable_grad(), autocast, libragrad(model, args.preset if rewired else False):
            logits = model.head(model.forward_blocks(r0))
            torch.autograd.grad(logits.gather(1, target[:, None]).sum(), r0)
        sync()
        return time.perf_counter() - start

    for _ in range(3):  # warm-up (kernels, allocator)
        grad_pass(False)
        grad_pass(True)
    plain, rewired = [], []
    for _ in range(args.repeats):
        plain.append(grad_pass(False))
        rewired.append(grad_pass(True))
    best_plain, best_rewired = min(plain), min(rewired)
    print(
        f"model={args.model} device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})"
        f" dtype={args.dtype} batch={args.batch} preset={args.preset} repeats={args.repeats}"
    )
    print(
        f"gradient pass, best of {args.repeats}: plain {best_plain * 1e3:.2f} ms, LibraGrad {best_rewired * 1e3:.2f} ms"
    )
    print(f"ratio LibraGrad / plain: {best_rewired / best_plain:.3f}")


if __name__ == "__main__":
    main()
