"""Faithfulness metric speed: the batched metrics vs plain loops, on the FashionGrid model, in one run.

For every (metric, score) — LibraGrad MIF / LIF / SRG x prob / logit / top1 / aopc / log_odds (tokens dropped
from the sequence, ratios 0.1..0.9) and RISE pixel deletion / insertion (prob, K = 56 steps) — the time of one
`metric.update(batch, model)` on a fresh batch (nothing cached; only that metric alive) is compared with

- `plain`: one forward per (pair, step): each perturbed sequence / image runs alone (batch 1), plus one
  unperturbed forward per pair, the way a straightforward implementation (or Quantus, per image) does it;
- `per-step`: a loop over the steps that batches the pairs (one forward per step and order, P sequences).

and the whole set (the 15 token metrics and the 2 pixel metrics on one batch, sharing their forwards through
the per-batch cache) with the sum of the plain / per-step loops each metric would run on its own. Values are
checked against the plain loop. Timing: best of `--repeats`, interleaved, after a warm-up.

Measured 2026-11-27 on this project's CPU machine (2 cores, otherwise idle; 1 torch thread, 8 FashionGrid
test grids = 21 (image, class) pairs, best of 3, `python benchmarks/metric_speed.py --images 8 --repeats 3`;
pixel metrics with their CPU default of 32 images per forward):

    metric          score       ours ms  plain ms  step ms  x plain  x step
    MIF             prob          308.7     894.6    301.0     2.9x   0.98x
    MIF             logit         325.0     872.0    315.5     2.7x   0.97x
    MIF             top1          338.9     926.2    322.1     2.7x   0.95x
    MIF             aopc          244.0     622.7    236.4     2.6x   0.97x
    MIF             log_odds      236.4     577.6    234.8     2.4x   0.99x
    LIF             prob          248.8     603.7    337.3     2.4x   1.36x
    LIF             logit         236.5     583.7    235.4     2.5x   1.00x
    LIF             top1          243.2     668.1    252.7     2.7x   1.04x
    LIF             aopc          232.6     587.4    234.8     2.5x   1.01x
    LIF             log_odds      244.6     767.3    315.1     3.1x   1.29x
    SRG             prob          412.2    1110.7    486.6     2.7x   1.18x
    SRG             logit         441.4    1472.1    461.3     3.3x   1.04x
    SRG             top1          539.1    1695.4    564.7     3.1x   1.05x
    SRG             aopc          395.2    1062.6    420.6     2.7x   1.06x
    SRG             log_odds      393.8    1044.0    429.7     2.7x   1.09x
    pixel_deletion  prob         2270.3    5208.0   2305.0     2.3x   1.02x
    pixel_insertion prob         2252.0    4735.5   2257.3     2.1x   1.00x
    17 of 17 (metric, score) ratios against the plain loop are >= 2x
    15 token metrics on one batch (shared forwards): 400 ms; separate plain loops 13488 ms (33.7x), separate per-step loops 5148 ms (12.88x)
    2 pixel metrics on one batch (shared forwards): 4617 ms; separate plain loops 9944 ms (2.2x), separate per-step loops 4562 ms (0.99x)
    all 17: 5017 ms; plain 4.7x, per-step 1.94x

Honestly: one metric alone is no faster than a loop that batches the pairs and runs one forward per step
(0.95-1.36x above). The token-drop path *is* such a loop, batched over
pairs and both orders (all sequences of one length run together: MIF at ratio r and LIF at ratio r have the
same length); padding all lengths into one key-masked batch was measured about 2x slower on this CPU (the
padding doubles the tokens and the masks take SDPA off its fast path). The pixel path packs all (pair, step)
images into `max_batch` chunks (32 on a CPU: larger batches were 1.3x slower per image), as fast as per-step batches. The gains are
against one forward per (pair, step) (2.4-3.3x for the token metrics, 2.1-2.3x for the pixel metrics) and from
sharing: the 15 token metrics (MIF / LIF / SRG x 5 scores) together cost one MIF + LIF computation, 12x less
than 15 separate per-step loops.

With `--quantus` it compares instead, on any timm model and device, the patch-deletion curve of the pixel path
(nearest-upsampled patch maps, one patch a step, black baseline, target logits: K = N steps) with Quantus's
RegionPerturbation on the same curves (MoRF, patch-sized regions, one forward per image and step): same
images, same maps, values checked in float32 on two images, time in the chosen dtype (bf16 = autocast for both,
Quantus through a wrapper; Quantus 0.6 runs one forward per step over the batch of images), and, for reference, our 15 token metrics (MIF / LIF / SRG x 5 scores) on the same
pairs. `--json` writes the figures.

Examples:
    python benchmarks/metric_speed.py --images 8 --repeats 3 --threads 1
    python benchmarks/metric_speed.py --quantus --device cuda --model vit_base_patch16_224 --dtype bf16 \
        --images 8 --json quantus.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from caap.batch import AttributionBatch
from caap.metrics import LIF, MIF, SRG, PixelDeletion, PixelInsertion
from caap.metrics.functional.faithfulness import removal_counts
from caap.metrics.functional.pixel_perturbation import baseline_images, step_counts
from caap.models.vit import ViTClassifier
from caap.scores import CURVE_SCORES as SCORES

TOKEN_METRICS = {"MIF": MIF, "LIF": LIF, "SRG": SRG}
PIXEL_METRICS = {"pixel_deletion": PixelDeletion, "pixel_insertion": PixelInsertion}


def load(images: int) -> tuple[ViTClassifier, AttributionBatch]:
    """The shipped FashionGrid model and `images` test grids, one pair per present class, seeded random maps."""
    from caap.data.fashiongrid import FashionGrid
    from caap.models import build_model

    model = build_model("vit_fashiongrid_patch7_56", pretrained=True, multilabel=True).eval()
    data = FashionGrid(split="test", size=images, seed=0)
    imgs, classes, index = [], [], []
    for i in range(images):
        sample = data[i]
        for c in sample["target"].nonzero().flatten().tolist():
            imgs.append(sample["image"])
            classes.append(c)
            index.append(i)
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(len(imgs), 8, 8, generator=g)
    batch = AttributionBatch(
        images=torch.stack(imgs), maps=maps, classes=torch.tensor(classes), index=torch.tensor(index)
    )
    return model, batch


def _scores(model: ViTClassifier, logits: Tensor, c: Tensor, p0: Tensor | None) -> dict[str, Tensor]:
    logits = logits.float()
    logp = F.logsigmoid(logits) if model.multilabel else logits.log_softmax(-1)
    lp = logp.gather(1, c[:, None])[:, 0]
    out = {
        "prob": lp.exp(),
        "logit": logits.gather(1, c[:, None])[:, 0],
        "top1": (logits.argmax(-1) == c).float(),
    }
    if p0 is not None:
        out["aopc"] = p0.exp() - lp.exp()
        out["log_odds"] = p0 - lp
    return out


@torch.no_grad()
def token_loop(
    model: ViTClassifier, batch: AttributionBatch, order: str, score: str, per_step: bool
) -> Tensor:
    """Curves `[P, K + 1]` by a plain loop: one forward per (pair, step), or per step over all pairs."""
    images, maps, classes = batch.images, batch.maps, batch.classes
    p, n, npre = maps.shape[0], maps[0].numel(), model.num_prefix_tokens
    counts = removal_counts(n, None)
    ranking = maps.reshape(p, n).sort(dim=1, descending=True, stable=True).indices
    orders = ("mif", "lif") if order == "srg" else (order,)
    curves = {}
    if per_step:
        full = _scores(model, model(images), classes, None)
        lp0 = (full["prob"]).log()
        r0 = model.embed(images)
        for o in orders:
            cols = [torch.zeros(p) if score in ("aopc", "log_odds") else full[score]]
            for c in counts:
                kept = ranking[:, c:] if o == "mif" else ranking[:, : n - c]
                idx = torch.cat([torch.arange(npre).expand(p, npre), kept.sort(dim=1).values + npre], 1)
                seq = r0[torch.arange(p)[:, None], idx]
                cols.append(_scores(model, model.head(model.forward_blocks(seq)), classes, lp0)[score])
            curves[o] = torch.stack(cols, 1)
    else:
        rows = {o: [] for o in orders}
        for i in range(p):
            ci = classes[i : i + 1]
            full = _scores(model, model(images[i : i + 1]), ci, None)
            lp0 = full["prob"].log()
            r0 = model.embed(images[i : i + 1])
            for o in orders:
                vals = [torch.zeros(1) if score in ("aopc", "log_odds") else full[score]]
                for c in counts:
                    kept = ranking[i, c:] if o == "mif" else ranking[i, : n - c]
                    idx = torch.cat([torch.arange(npre), kept.sort().values + npre])
                    logits = model.head(model.forward_blocks(r0[:, idx]))
                    vals.append(_scores(model, logits, ci, lp0)[score])
                rows[o].append(torch.cat(vals))
        curves = {o: torch.stack(r) for o, r in rows.items()}
    return curves["lif"] - curves["mif"] if order == "srg" else curves[order]


@torch.no_grad()
def pixel_loop(model: ViTClassifier, batch: AttributionBatch, mode: str, per_step: bool) -> Tensor:
    """RISE prob curves `[P, K + 1]` by a plain loop (K = H steps), per (pair, step) or per step."""
    images, maps, classes = batch.images, batch.maps, batch.classes
    p, _, h, w = images.shape
    counts = step_counts(h * w, h)
    base = baseline_images(
        model, images, "mean_color" if mode == "deletion" else PixelInsertion.default_baseline
    )
    up = F.interpolate(maps[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
    order = up.reshape(p, -1).sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(p, -1))

    def perturbed(rows: Tensor, c: int) -> Tensor:
        top = (rank[rows] < c).reshape(-1, 1, h, w)
        if mode == "deletion":
            return torch.where(top, base[rows], images[rows])
        return torch.where(top, images[rows], base[rows])

    if per_step:
        rows = torch.arange(p)
        cols = [_scores(model, model(perturbed(rows, c)), classes, None)["prob"] for c in counts]
        return torch.stack(cols, 1)
    out = torch.empty(p, len(counts))
    for i in range(p):
        r = torch.tensor([i])
        for s, c in enumerate(counts):
            out[i, s] = _scores(model, model(perturbed(r, c)), classes[r], None)["prob"][0]
    return out


def fresh(batch: AttributionBatch) -> AttributionBatch:
    """A new batch object (the per-batch cache starts empty), sharing the tensors."""
    return AttributionBatch(images=batch.images, maps=batch.maps, classes=batch.classes, index=batch.index)


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time in seconds of each function, interleaved, after one warm-up call each."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            gc.collect()
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def ours_alone(cls: type, batch: AttributionBatch, model: ViTClassifier, **kwargs) -> Callable[[], Tensor]:
    def run() -> Tensor:
        metric = cls(**kwargs)
        b = fresh(batch)
        metric.update(b, model)
        curves = metric.per_sample_curves()[2]
        del metric, b
        return curves

    return run


class AutocastModel(torch.nn.Module):
    """`model` under autocast to `dtype` with float32 logits: how Quantus (which calls `model(x)`) runs bf16."""

    def __init__(self, model: ViTClassifier, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        with torch.autocast(device, dtype=self.dtype) if self.dtype else contextlib.nullcontext():
            return self.model(x).float()


def quantus_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """Our patch-deletion curves vs Quantus RegionPerturbation on the same images and maps (see the docstring)."""
    import numpy as np
    import quantus

    from caap.metrics.functional.pixel_perturbation import pixel_perturbation_outcomes
    from caap.models import build_model

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(args.model).to(device).eval()
    size = tuple(model.model.patch_embed.img_size)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, *size, generator=g)
    gh, gw = model.grid_size(images)
    maps = torch.randn(args.images, gh, gw, generator=g)  # random patch values: no ties
    with torch.no_grad():
        classes = model(images.to(device)).argmax(-1).cpu()
    steps, patch = gh * gw, model.patch_size[0]
    up = F.interpolate(maps[:, None], size=size, mode="nearest")
    dtype = torch.bfloat16 if args.dtype == "bf16" else None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def ours(n: int, low: torch.dtype | None) -> Tensor:  # drops [n, K]: logit_0 - logit_k
        amp = torch.autocast(device.type, dtype=low) if low else contextlib.nullcontext()
        with torch.no_grad(), amp:
            out = pixel_perturbation_outcomes(
                model,
                images[:n],
                maps[:n],
                classes[:n],
                "deletion",
                "black",
                steps,
                "nearest",
                args.max_batch,
            )
        sync()
        return (out.logit[:, :1] - out.logit[:, 1:]).float().cpu()

    def theirs(n: int, low: torch.dtype | None) -> np.ndarray:
        metric = quantus.RegionPerturbation(
            patch_size=patch, regions_evaluation=steps, order="morf", normalise=False, abs=False,
            perturb_baseline=0.0, disable_warnings=True,
        )  # fmt: skip
        got = metric(
            model=AutocastModel(model, low).eval(), x_batch=images[:n].numpy(), y_batch=classes[:n].numpy(),
            a_batch=up[:n].numpy(), device=str(device), softmax=False, channel_first=True,
        )  # fmt: skip
        sync()
        return np.asarray(got, dtype=np.float64)

    check = min(2, args.images)
    want, got = theirs(check, None), ours(check, None).numpy()
    diff = float(np.abs(want - got).max())
    scale = float(np.abs(want).max())
    ours(args.images, dtype)  # warm-up (kernels, autotuning)
    best = math.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours(args.images, dtype)
        best = min(best, time.perf_counter() - t0)
    t0 = time.perf_counter()
    theirs(args.images, dtype)  # one forward per image and step: timed once
    quantus_seconds = time.perf_counter() - t0

    batch = AttributionBatch(
        images=images.to(device), maps=maps.to(device), classes=classes.to(device),
        index=torch.arange(args.images, device=device),
    )  # fmt: skip

    def token_metrics() -> None:
        amp = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        fresh_batch = fresh(batch)
        with torch.no_grad(), amp:
            for cls in TOKEN_METRICS.values():
                for score in SCORES:
                    cls(score=score).to(device).update(fresh_batch, model)
        sync()

    token_metrics()
    t0 = time.perf_counter()
    token_metrics()
    token_seconds = time.perf_counter() - t0
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": args.dtype,
        "images": args.images,
        "steps": steps,
        "ours_seconds": best,
        "quantus_seconds": quantus_seconds,
        "speedup_vs_quantus": quantus_seconds / best,
        "ours_curves_per_second": args.images / best,
        "quantus_curves_per_second": args.images / quantus_seconds,
        "float32_check_images": check,
        "float32_max_abs_diff": diff,
        "float32_values_match": diff <= 1e-3 * max(1.0, scale),
        "token_metrics_15_seconds": token_seconds,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8, help="FashionGrid test grids (one pair per class)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quantus", action="store_true", help="our patch deletion vs Quantus RegionPerturbation"
    )
    parser.add_argument(
        "--model", default="vit_base_patch16_224", help="--quantus: timm model (random weights)"
    )
    parser.add_argument("--device", default="cpu", help="--quantus: device")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="--quantus: bf16 = autocast"
    )
    parser.add_argument("--max-batch", type=int, default=256, help="--quantus: images per forward (ours)")
    parser.add_argument("--json", type=Path, default=None, help="--quantus: write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quantus:
        quantus_comparison(args)
        return
    if args.device != "cpu":
        parser.error("the FashionGrid loops run on the CPU; --device is for --quantus")
    model, batch = load(args.images)
    print(
        f"FashionGrid model, {args.images} images, {len(batch)} (image, class) pairs, {args.threads} thread(s)"
    )
    print(
        f"{'metric':<16}{'score':<10}{'ours ms':>9}{'plain ms':>10}{'step ms':>9}{'x plain':>9}{'x step':>8}"
    )
    total = {"plain": 0.0, "step": 0.0}
    rows = []
    for name, cls in TOKEN_METRICS.items():
        order = name.lower()
        for score in SCORES:
            ours = ours_alone(cls, batch, model, score=score)
            got = ours()
            want = token_loop(model, batch, order, score, per_step=False)
            torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=0)  # same values as the plain loop
            t = best_of(
                {
                    "ours": ours,
                    "plain": lambda o=order, s=score: token_loop(model, batch, o, s, False),
                    "step": lambda o=order, s=score: token_loop(model, batch, o, s, True),
                },
                args.repeats,
            )
            rows.append((name, score, t))
    for name, cls in PIXEL_METRICS.items():
        mode = name.split("_")[1]
        ours = ours_alone(cls, batch, model)
        got = ours()
        torch.testing.assert_close(got.float(), pixel_loop(model, batch, mode, False), atol=5e-5, rtol=0)
        t = best_of(
            {
                "ours": ours,
                "plain": lambda m=mode: pixel_loop(model, batch, m, False),
                "step": lambda m=mode: pixel_loop(model, batch, m, True),
            },
            args.repeats,
        )
        rows.append((name, "prob", t))
    for name, score, t in rows:
        total["plain"] += t["plain"]
        total["step"] += t["step"]
        print(
            f"{name:<16}{score:<10}{1e3 * t['ours']:>9.1f}{1e3 * t['plain']:>10.1f}{1e3 * t['step']:>9.1f}"
            f"{t['plain'] / t['ours']:>8.1f}x{t['step'] / t['ours']:>7.2f}x"
        )
    n_ok = sum(t["plain"] / t["ours"] >= 2 for _, _, t in rows)
    print(f"{n_ok} of {len(rows)} (metric, score) ratios against the plain loop are >= 2x")

    def whole_set(classes: list[type], scores: tuple[str, ...] | None) -> Callable[[], None]:
        def run() -> None:
            metrics = [cls(score=s) for cls in classes for s in scores] if scores else [c() for c in classes]
            b = fresh(batch)
            for metric in metrics:
                metric.update(b, model)
            del metrics, b

        return run

    sets = {
        "15 token metrics": (whole_set(list(TOKEN_METRICS.values()), SCORES), rows[:15]),
        "2 pixel metrics": (whole_set(list(PIXEL_METRICS.values()), None), rows[15:]),
    }
    times = best_of({k: fn for k, (fn, _) in sets.items()}, args.repeats)
    for key, (_, members) in sets.items():
        plain = sum(t["plain"] for _, _, t in members)
        step = sum(t["step"] for _, _, t in members)
        print(
            f"{key} on one batch (shared forwards): {1e3 * times[key]:.0f} ms; separate plain loops "
            f"{1e3 * plain:.0f} ms ({plain / times[key]:.1f}x), separate per-step loops {1e3 * step:.0f} ms "
            f"({step / times[key]:.2f}x)"
        )
    t_all = sum(times.values())
    print(
        f"all {len(rows)}: {1e3 * t_all:.0f} ms; plain {total['plain'] / t_all:.1f}x, "
        f"per-step {total['step'] / t_all:.2f}x"
    )


if __name__ == "__main__":
    main()
