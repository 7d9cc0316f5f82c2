"""Cost of LibraGrad: one gradient pass (forward + backward to r_0) plain vs under `libragrad(model, preset)`.

Interleaved runs (plain, preset 1, preset 2, ..., plain, ...), best of N each, one process; prints each preset's
time and its ratio to the plain pass (and, on CUDA, the peak memory of one pass of each kind).

    .venv/bin/python benchmarks/libragrad_cost.py                       # FashionGrid ViT on the CPU
    .venv/bin/python benchmarks/libragrad_cost.py --model vit_base_patch16_224 --batch 64 --device cuda \\
        --dtype bfloat16 --presets full wo_head attnlrp
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from caap.methods.libragrad import PRESETS, libragrad
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
    parser.add_argument("--presets", nargs="+", default=["full"], choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--attention-backward",
        default=None,
        choices=["auto", "value_only", "sdpa"],
        help="LibraGrad's fused-attention backward (env CAAP_LIBRAGRAD_ATTENTION_BACKWARD)",
    )
    parser.add_argument("--profile", action="store_true", help="also print the top ops of plain vs preset 1")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.attention_backward:
        os.environ["CAAP_LIBRAGRAD_ATTENTION_BACKWARD"] = args.attention_backward
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model).to(device).requires_grad_(False)  # as in AttributionModule
    size = model.model.patch_embed.img_size
    images = torch.rand(args.batch, 3, *size, device=device)
    target = torch.zeros(args.batch, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def grad_pass(preset: str | None) -> float:
        with torch.no_grad():
            r0 = model.embed(images)
        r0.requires_grad_(True)
        sync()
        start = time.perf_counter()
        with torch.enable_grad(), autocast, libragrad(model, preset or False):
            logits = model.head(model.forward_blocks(r0))
            torch.autograd.grad(logits.gather(1, target[:, None]).float().sum(), r0)
        sync()
        return time.perf_counter() - start

    kinds: list[str | None] = [None, *args.presets]
    for _ in range(3):  # warm-up (kernels, allocator, autotuning)
        for kind in kinds:
            grad_pass(kind)
    peak: dict[str | None, float] = {}
    if cuda:
        for kind in kinds:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            grad_pass(kind)
            peak[kind] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    times: dict[str | None, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            times[kind].append(grad_pass(kind))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        for kind in (None, args.presets[0]):
            with profile(activities=activities) as prof:
                grad_pass(kind)
            print(f"-- profile: {kind or 'plain'}")
            print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(
        f"model={args.model} device={device} ({name}) dtype={args.dtype} batch={args.batch} "
        f"repeats={args.repeats} attention_backward="
        f"{os.environ.get('CAAP_LIBRAGRAD_ATTENTION_BACKWARD', 'auto')} (best of each kind, interleaved)"
    )
    plain = min(times[None])
    rows = []
    for kind in kinds:
        best = min(times[kind])
        memory = f"  peak {peak[kind]:8.1f} MiB" if cuda else ""
        label = kind or "plain"
        print(f"  {label:10s} {best * 1e3:9.2f} ms  ratio {best / plain:6.3f}{memory}")
        rows.append(
            {
                "model": args.model,
                "device": name,
                "dtype": args.dtype,
                "batch": args.batch,
                "attention_backward": os.environ.get("CAAP_LIBRAGRAD_ATTENTION_BACKWARD", "auto"),
                "kind": label,
                "ms": best * 1e3,
                "ratio_to_plain": best / plain,
                "peak_mib": peak.get(kind),
            }
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
