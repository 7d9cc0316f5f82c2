"""CAAP engine speed: the batched engine (eager, or with `compile`) vs a per-patch reference loop vs Captum's
FeatureAblation.

Same model, same images, one run. CAAP (arXiv 2603.13652) costs N partial forward passes per image (from
`start` on); Captum's `FeatureAblation` with one feature per patch (baseline = the neutral image) costs N full
forward passes, batched `perturbations_per_eval` at a time (set so that both batch about the same number of
sequences per pass). The reference loop patches one image and one patch at a time with forward pre-hooks
(it is slow: it runs on `--ref-images` images and is reported per image).

Timing is in-process and interleaved (engine, Captum, engine, Captum, ...; the best of `--repeats` after a
warm-up), so that a drifting background load hits every method alike. Peak memory: on a GPU,
`torch.cuda.max_memory_allocated` minus the memory allocated before the method; on the CPU each method runs
once more in a fresh subprocess and reports its peak RSS minus its RSS before the method (`--no-memory` skips
it). The engine's own activation estimate for its chunk is printed beside it. Model FLOP utilisation counts,
per image, N patched passes x (L - start) / L of one forward (2 FLOPs per multiply-add; ~35 GFLOP for ViT-B/16).
`engine_compiled` is the engine with `method.compile=true` (its warm-up, which compiles, is reported apart);
several `--start` values are measured in one process (the compiled graphs are shared between them).

Examples:
    python benchmarks/caap_speed.py --models fashiongrid vit_small_patch16_224 --images 4
    python benchmarks/caap_speed.py --device cuda --dtype bf16 --models vit_base_patch16_224 --start 4 0 \
        --methods engine engine_compiled captum reference --images 64 --peak-tflops 989 --json rows.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

METHODS = ("engine", "engine_compiled", "captum", "reference")
DEFAULT_METHODS = ("engine", "captum", "reference")
ALIASES = {"fashiongrid": "vit_fashiongrid_patch7_56"}


def _rss_mb() -> float:
    """Current resident set size in MB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident set size (VmHWM) in MB since the last reset, or since the start of the process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(name: str, device: str, fused: bool) -> Any:
    from caap.models import build_model
    from caap.models.embedded import FASHIONGRID_MODEL, FASHIONGRID_WEIGHTS

    name = ALIASES.get(name, name)
    pretrained = name == FASHIONGRID_MODEL and FASHIONGRID_WEIGHTS.is_file()
    model = build_model(name, pretrained=pretrained, fused_attn=fused)
    return model.to(device).eval(), pretrained


def forward_flops(model: Any, num_tokens: int) -> float:
    """FLOPs of one forward (2 per multiply-add): per block 2*T*(#block weights) + 4*T^2*D attention."""
    vit = model.model
    d = vit.embed_dim
    per_block = sum(
        p.numel() for n, p in vit.blocks[0].named_parameters() if n.endswith("weight") and p.ndim == 2
    )
    return model.depth * (2 * num_tokens * per_block + 4 * num_tokens**2 * d)


def _capture(
    model: Any, image: torch.Tensor, sites: list[torch.nn.Module], positions: range
) -> dict[int, torch.Tensor]:
    """Residuals `r_j` `[1, T, D]` of one image at `positions`, read by forward pre-hooks on `sites[j]`."""
    src: dict[int, torch.Tensor] = {}

    def make(j: int) -> Any:
        return lambda module, args: src.__setitem__(j, args[0].clone())

    handles = [sites[j].register_forward_pre_hook(make(j)) for j in positions]
    try:
        model(image)
    finally:
        for h in handles:
            h.remove()
    return src


def _overwrite(src: torch.Tensor, token: int) -> Any:
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x[:, token] = src[:, token].to(x.dtype)
        return (x, *args[1:])

    return hook


def reference_caap(
    model: Any, images: torch.Tensor, target: torch.Tensor, neutral: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """Per-patch loop ("hold" over positions `range(start, stop)`): one image and one patch at a time, forward
    pre-hooks overwrite token i of a full neutral run. Maps `[B, gh, gw]`."""
    p = model.num_prefix_tokens
    gh, gw = model.grid_size(images)
    sites = [*model.blocks, model.model.norm]  # the input of sites[j] is r_j
    positions = range(start, stop)
    maps = torch.zeros(images.shape[0], gh * gw)
    for b in range(images.shape[0]):
        src = _capture(model, images[b : b + 1], sites, positions)
        for i in range(gh * gw):
            handles = [sites[j].register_forward_pre_hook(_overwrite(src[j], p + i)) for j in positions]
            try:
                maps[b, i] = model(neutral)[0, target[b]].float()
            finally:
                for h in handles:
                    h.remove()
    return maps.view(-1, gh, gw)


def captum_ablation(
    model: Any, images: torch.Tensor, target: torch.Tensor, neutral: torch.Tensor, per_eval: int
) -> torch.Tensor:
    """Captum FeatureAblation, one feature per patch, baseline = the neutral image."""
    from captum.attr import FeatureAblation

    gh, gw = model.grid_size(images)
    ph, pw = model.patch_size
    ids = torch.arange(gh * gw, device=images.device).view(1, 1, gh, gw)
    mask = ids.repeat_interleave(ph, 2).repeat_interleave(pw, 3)
    mask = torch.nn.functional.pad(
        mask, (0, images.shape[-1] - mask.shape[-1], 0, images.shape[-2] - mask.shape[-2])
    )
    ablation = FeatureAblation(model)
    return ablation.attribute(
        images,
        baselines=neutral.expand_as(images),
        target=target,
        feature_mask=mask,
        perturbations_per_eval=per_eval,
    )


def prepare(args: argparse.Namespace, model_name: str, start_arg: int | None) -> dict[str, Any]:
    """Model, images, targets, neutral image, CAAP objects and sizes for one model and start."""
    from caap.methods.caap import CAAP
    from caap.models.memory import estimate_sequence_bytes

    device = args.device
    model, pretrained = _build(model_name, device, args.fused)
    depth = model.depth
    start = start_arg if start_arg is not None else depth // 3
    size = model.model.patch_embed.img_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(max(args.images, args.ref_images), 3, *size, generator=gen).to(device)
    method = CAAP(start=start, stop=args.stop, neutral="mean_color", chunk_size=args.chunk_size)
    method.setup(model)
    compiled = CAAP(
        start=start, stop=args.stop, neutral="mean_color", chunk_size=args.chunk_size, compile=True
    )
    gh, gw = model.grid_size(images)
    num_tokens = gh * gw + model.num_prefix_tokens
    with torch.no_grad(), autocast(args):
        target = model(images).argmax(-1)
        chunk = method.chunk_for(model, images)
        neutral = method.neutral.images(images, model)[0]  # [1, 3, H, W]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    label = ALIASES.get(model_name, model_name)
    if "fashiongrid" in label and not pretrained:
        label += " (random)"
    return dict(
        model=model,
        label=label,
        images=images,
        target=target,
        neutral=neutral,
        method=method,
        compiled=compiled,
        start=start,
        depth=depth,
        num_patches=gh * gw,
        num_tokens=num_tokens,
        chunk=chunk,
        seq_bytes=estimate_sequence_bytes(model, num_tokens, dtype),
    )


def autocast(args: argparse.Namespace) -> Any:
    if args.dtype != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)


def make_call(args: argparse.Namespace, ctx: dict[str, Any], method: str) -> Any:
    """A function running `method` once on its images (the reference on `--ref-images` of them)."""
    model, target, neutral = ctx["model"], ctx["target"], ctx["neutral"]
    cuda = torch.device(args.device).type == "cuda"
    n = args.ref_images if method == "reference" else args.images
    images, target = ctx["images"][:n], target[:n]

    def call() -> None:
        with torch.no_grad(), autocast(args):
            if method == "engine":
                ctx["method"](model, images, target)
            elif method == "engine_compiled":
                ctx["compiled"](model, images, target)
            elif method == "captum":
                captum_ablation(model, images, target, neutral, max(1, ctx["chunk"] // n))
            else:
                reference_caap(model, images, target, neutral, *ctx["method"].layer_range(model))
        if cuda:
            torch.cuda.synchronize()

    return call


def memory_worker(args: argparse.Namespace, model_name: str, start: int | None, method: str) -> float:
    """Peak memory (MB) of one run of `method` above what was in use before it."""
    ctx = prepare(args, model_name, start)
    call = make_call(args, ctx, method)
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    import captum.attr  # noqa: F401  (imports and one-time library set-up are not the method's memory)

    with torch.no_grad(), autocast(args):
        ctx["model"](ctx["images"][:1])
    before = _rss_mb()
    if not _reset_peak_rss():
        print("warning: cannot reset the peak-RSS mark; peak memory includes set-up", file=sys.stderr)
    call()
    return max(0.0, _peak_rss_mb() - before)


def save_trace(call: Any, path: Path, cuda: bool) -> None:
    """A torch profiler trace (Chrome format) of one call, and its top operators by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        call()
    prof.export_chrome_trace(str(path))
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60), file=sys.stderr)


def bench_model(
    args: argparse.Namespace, model_name: str, start: int | None, trace: Path | None = None
) -> list[dict[str, Any]]:
    """Rows (one per method) for one model and start: interleaved timing, then peak memory; with `trace`, a
    profiler trace of one engine call."""
    ctx = prepare(args, model_name, start)
    calls = {m: make_call(args, ctx, m) for m in args.methods}
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    warmup: dict[str, float] = {}
    for m in args.methods:  # warm-up (the reference loop is only warmed by the others; compile happens here)
        if m != "reference":
            t0 = time.perf_counter()
            calls[m]()
            warmup[m] = time.perf_counter() - t0
    for r in range(args.repeats):
        for m in args.methods:
            if m == "reference" and r > 0:
                continue  # slow: timed once
            t0 = time.perf_counter()
            calls[m]()
            times[m].append(time.perf_counter() - t0)
            print(f"  {ctx['label']} {m}: {times[m][-1]:.2f} s", file=sys.stderr, flush=True)
    cuda = torch.device(args.device).type == "cuda"
    if trace is not None and "engine" in calls:
        save_trace(calls["engine"], trace, cuda)
    rows = []
    for m in args.methods:
        n = args.ref_images if m == "reference" else args.images
        if not args.memory:
            peak = math.nan
        elif cuda:
            peak = memory_worker_in_process(ctx, calls[m])
        else:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--memory-worker", model_name, str(start), m]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@PEAK")]
            peak = float(lines[-1][6:]) if lines else math.nan
        best = min(times[m])
        row = {
            "model": ctx["label"],
            "method": m,
            "depth": ctx["depth"],
            "start": ctx["start"],
            "images": n,
            "chunk": ctx["chunk"],
            "dtype": args.dtype,
            "seconds": best,
            "warmup_seconds": warmup.get(m, math.nan),
            "images_per_s": n / best,
            "peak_mb": peak,
            "chunk_est_mb": min(ctx["chunk"], n * ctx["num_patches"]) * ctx["seq_bytes"] / 2**20,
            "device": torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads",
        }
        if m.startswith("engine"):
            frac = (ctx["depth"] - ctx["start"]) / ctx["depth"]
            row["flops_per_image"] = (
                ctx["num_patches"] * frac * forward_flops(ctx["model"], ctx["num_tokens"])
            )
            if args.peak_tflops:
                row["mfu"] = row["flops_per_image"] * row["images_per_s"] / (args.peak_tflops * 1e12)
        rows.append(row)
    return rows


def memory_worker_in_process(ctx: dict[str, Any], call: Any) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    device = rows[0]["device"] if rows else args.device
    print(f"\ndevice: {device}, dtype {args.dtype}, fused attention {args.fused}")
    header = (
        f"{'model':36} {'method':15} {'L':>3} {'start':>5} {'imgs':>4} {'chunk':>5} {'s':>8} {'img/s':>8} "
        f"{'vs captum':>9} {'vs ref':>8} {'peak MB':>8} {'est MB':>7} {'MFU':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        same = [r for r in rows if (r["model"], r["start"]) == (row["model"], row["start"])]
        cap = next((r["images_per_s"] for r in same if r["method"] == "captum"), math.nan)
        ref = next((r["images_per_s"] for r in same if r["method"] == "reference"), math.nan)
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else ""
        print(
            f"{row['model']:36} {row['method']:15} {row['depth']:>3} {row['start']:>5} {row['images']:>4} "
            f"{row['chunk']:>5} {row['seconds']:>8.2f} {row['images_per_s']:>8.3f} "
            f"{row['images_per_s'] / cap:>8.2f}x {row['images_per_s'] / ref:>7.1f}x {row['peak_mb']:>8.0f} "
            f"{row['chunk_est_mb']:>7.0f} {mfu:>6}"
        )
        if "flops_per_image" in row:
            tflops = row["flops_per_image"] * row["images_per_s"] / 1e12
            print(
                f"{'':36} engine: {row['flops_per_image'] / 1e9:.0f} GFLOP/image, {tflops:.2f} TFLOP/s achieved"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["fashiongrid", "vit_small_patch16_224"])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--images", type=int, default=4, help="images for the engine and Captum")
    parser.add_argument("--ref-images", type=int, default=1, help="images for the slow reference loop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast")
    parser.add_argument(
        "--start", type=int, nargs="+", default=[None], help="layers.start, one or more (default L // 3)"
    )
    parser.add_argument("--stop", type=int, default=None, help="layers.stop (default: through L)")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="sequences per pass (default: from memory)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed rounds after a warm-up; the best is reported"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="explicit softmax attention")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak, for model FLOP utilisation"
    )
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    parser.add_argument(
        "--trace", type=Path, default=None, help="a profiler trace of one engine call (first model and start)"
    )
    parser.add_argument(
        "--memory-worker", nargs=3, metavar=("MODEL", "START", "METHOD"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_worker:
        name, start, method = args.memory_worker
        print(f"@@PEAK{memory_worker(args, name, None if start == 'None' else int(start), method)}")
        return
    cases = [(name, start) for name in args.models for start in args.start]
    rows = [
        row
        for i, (name, start) in enumerate(cases)
        for row in bench_model(args, name, start, args.trace if i == 0 else None)
    ]
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
