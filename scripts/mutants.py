"""Mutation check: plant curated single bugs in the core and check that the tests meant to catch them do.

Each mutant is one exact snippet of a source file (under `src/` or `conf/`) replaced by a buggy variant. For
each mutant the script copies `src/` and `conf/` to a temporary folder, applies the mutant to the copy (the
working tree is never touched), and runs the mutant's test files from this repository against the copy
(`PYTHONPATH=<copy>/src`; `caap.paths` then finds the copy's `conf/`), with `-x` and one torch thread. A
mutant is killed when a test fails; the table names that test. The script exits non-zero unless every mutant
is killed: a survivor, a timeout, or a snippet not found exactly once (code moved: refresh the snippet).

    python scripts/mutants.py                 # every mutant (`make mutants`)
    python scripts/mutants.py --check         # only check that every snippet is found, run nothing
    python scripts/mutants.py --only resume-recompute-all dedup-index-only
    python scripts/mutants.py --list

Not part of `make test`: it runs the named test files once per mutant (tens of minutes on a laptop CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("src", "conf")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


@dataclass(frozen=True)
class Mutant:
    """One planted bug: `original` (found exactly once in `file`) becomes `replacement`; `tests` must fail."""

    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    bug: str


CAAP = "src/caap/methods/caap.py"
PATCHING = "src/caap/methods/patching.py"
LIBRAGRAD = "src/caap/methods/libragrad.py"
TOKENS = "src/caap/metrics/functional/faithfulness.py"
REMOVAL = "src/caap/token_removal.py"
VIT = "src/caap/models/vit.py"
PIXELS = "src/caap/metrics/functional/pixel_perturbation.py"
POINTING = "src/caap/metrics/functional/pointing.py"
LOCALISATION = "src/caap/metrics/functional/localisation.py"
REFERENCES = "src/caap/references/images.py"
BOOTSTRAP = "src/caap/stats/bootstrap.py"
PAIRED = "src/caap/stats/paired.py"

MUTANTS: tuple[Mutant, ...] = (
    # -- CAAP engine ------------------------------------------------------------------------------------------
    Mutant(
        "caap-hold-positions",
        PATCHING,
        'return list(range(start, stop)) if mode == "hold" else [start]',
        'return list(range(start, stop - 1)) if mode == "hold" else [start]',
        ("tests/test_caap.py",),
        "hold mode skips the last position of the range",
    ),
    Mutant(
        "caap-inject-position",
        PATCHING,
        'return list(range(start, stop)) if mode == "hold" else [start]',
        'return list(range(start, stop)) if mode == "hold" else [stop - 1]',
        ("tests/test_caap.py",),
        "inject mode writes at the end of the range instead of its start",
    ),
    Mutant(
        "caap-skip-first-write",
        PATCHING,
        "            if j in write_at and some:",
        "            if j in write_at and j > start and some:",
        ("tests/test_caap.py",),
        "the source tokens are not written at the first position of the range",
    ),
    Mutant(
        "caap-neutral-prefix-of-first-image",
        PATCHING,
        "x = prefix.index_select(0, image if nb > 1 else torch.zeros(width, dtype=torch.long, device=device))",
        "x = prefix.index_select(0, torch.zeros(width, dtype=torch.long, device=device))",
        ("tests/test_caap.py",),
        "an image-dependent neutral (blur) reuses the first image's prefix for every image",
    ),
    Mutant(
        "caap-neutral-cache-ignores-weights",
        CAAP,
        "                _param_signature(model),\n",
        "",
        ("tests/test_caap.py",),
        "the cached neutral prefix survives a change of the model's weights",
    ),
    Mutant(
        "caap-neutral-cache-image-dependent",
        CAAP,
        "if not self.neutral.depends_on_image:",
        "if True:",
        ("tests/test_caap.py",),
        "an image-dependent neutral prefix is cached across batches",
    ),
    Mutant(
        "caap-window-spreading",
        PATCHING,
        "nww = math.ceil(gw / window)",
        "nww = math.ceil(gh / window)",
        ("tests/test_caap.py",),
        "window scores are spread back with the wrong row stride on non-square grids",
    ),
    Mutant(
        "caap-noise-samples-not-averaged",
        "src/caap/methods/caap_estimators.py",
        "return {e: v / len(self.prefixes) for e, v in total.items()}",
        "return {e: v for e, v in total.items()}",
        ("tests/test_caap.py",),
        "maps of several noise samples are summed, not averaged",
    ),
    Mutant(
        "caap-branch-at-last-write-is-trunk",
        PATCHING,
        "split_at = {e for e in branches if e <= max(write_at, default=-1)}",
        "split_at = {e for e in branches if e < max(write_at, default=-1)}",
        ("tests/test_caap.py",),
        "a branch at the last write position is taken as the trunk, which made that write (layers=auto landscape)",
    ),
    # -- LibraGrad rules ----------------------------------------------------------------------------------------
    Mutant(
        "libragrad-layernorm-sigma",
        LIBRAGRAD,
        "grad, zero_x, shape, zero_mean, rstd, weight, None, [True, False, False]",
        "grad, x, shape, zero_mean, rstd, weight, None, [True, False, False]",
        ("tests/test_libragrad.py",),
        "the LayerNorm rule keeps the gradient through the normalising scale",
    ),
    Mutant(
        "libragrad-gate-not-frozen",
        LIBRAGRAD,
        "return gate.mul_(grad), None",
        "return grad, None",
        ("tests/test_libragrad.py",),
        "the activation rule passes the gradient through unscaled instead of times the gate",
    ),
    Mutant(
        "libragrad-value-attention-transpose",
        LIBRAGRAD,
        "torch.matmul(attn.transpose(-2, -1), g[i : i + rows], out=dv[i : i + rows])",
        "torch.matmul(attn, g[i : i + rows], out=dv[i : i + rows])",
        ("tests/test_libragrad.py",),
        "the value-only attention backward uses A instead of A^T",
    ),
    Mutant(
        "libragrad-gated-mlp-scale",
        LIBRAGRAD,
        'plan += [(m, "fwd", _scale_hook(0.5)) for m in sites.gated_mlp_products]',
        'plan += [(m, "fwd", _scale_hook(1.0)) for m in sites.gated_mlp_products]',
        ("tests/test_libragrad.py",),
        "gated-MLP products keep their full gradient (LibraGrad halves it)",
    ),
    # -- token removal (MIF / LIF / SRG) ------------------------------------------------------------------------
    Mutant(
        "tokens-ranking-swapped",
        TOKENS,
        'return torch.cat([rank >= c if o == "mif" else rank < n - c for o, c in keys])',
        'return torch.cat([rank < n - c if o == "mif" else rank >= c for o, c in keys])',
        ("tests/test_faithfulness.py",),
        "MIF keeps the most attributed tokens and LIF the least (orders swapped)",
    ),
    Mutant(
        "tokens-counts-rounded",
        TOKENS,
        "return [math.floor(r * n) for r in exact]",
        "return [round(r * n) for r in exact]",
        ("tests/test_faithfulness.py",),
        "MIF's removal counts rounded to the nearest integer instead of LibraGrad's floor",
    ),
    Mutant(
        "tokens-lif-counts-as-mif",
        TOKENS,
        "return [n - math.floor((1 - r) * n) for r in exact]",
        "return [math.floor(r * n) for r in exact]",
        ("tests/test_faithfulness.py",),
        "LIF removes floor(r n) tokens instead of keeping the top floor((1 - r) n)",
    ),
    Mutant(
        "tokens-drop-keeps-removed",
        REMOVAL,
        "idx = keep[sel].nonzero()[:, 1].reshape(len(members), kept)",
        "idx = (~keep[sel]).nonzero()[:, 1].reshape(len(members), keep.shape[1] - kept)",
        ("tests/test_token_removal.py", "tests/test_faithfulness.py"),
        "drop keeps the tokens it should remove",
    ),
    Mutant(
        "tokens-drop-prefix-offset",
        VIT,
        "x = r0[rows[:, None], torch.cat([prefix, kept + npre], dim=1)]",
        "x = r0[rows[:, None], torch.cat([prefix, kept], dim=1)]",
        ("tests/test_token_removal.py", "tests/test_faithfulness.py"),
        "kept patch indices are not shifted past the prefix tokens",
    ),
    Mutant(
        "tokens-drop-rope-not-gathered",
        VIT,
        "rope = rope.to(x.device)[kept][:, None]",
        "rope = rope.to(x.device)[: kept.shape[1]][None, None]",
        ("tests/test_token_removal.py",),
        "EVA's dropped sequence takes the first rotary positions instead of its tokens' own",
    ),
    Mutant(
        "tokens-replace-swapped",
        REMOVAL,
        "torch.where(kp[..., None], seq[:, npre:], baseline[rp, npre:])",
        "torch.where(kp[..., None], baseline[rp, npre:], seq[:, npre:])",
        ("tests/test_token_removal.py", "tests/test_faithfulness.py"),
        "replacement replaces the kept tokens instead of the removed ones",
    ),
    Mutant(
        "tokens-mask-pools-removed",
        REMOVAL,
        "logits.append(model.head(x, kp))",
        "logits.append(model.head(x))",
        ("tests/test_token_removal.py",),
        "the key-masked sequence's head pools the hidden tokens too",
    ),
    Mutant(
        "tokens-empty-pool-not-zero",
        VIT,
        "            w = x.new_zeros(x.shape[0], 0)\n",
        "            w = None\n",
        ("tests/test_token_removal.py", "tests/test_faithfulness.py"),
        "an empty pooled set is averaged by timm's mean (NaN) instead of the all-zero feature",
    ),
    # -- pixel deletion / insertion -----------------------------------------------------------------------------
    Mutant(
        "pixels-ranked-ascending",
        PIXELS,
        "order = torch.sort(flat, dim=1, descending=True, stable=True).indices",
        "order = torch.sort(flat, dim=1, descending=False, stable=True).indices",
        ("tests/test_faithfulness.py",),
        "pixels are deleted least attributed first",
    ),
    Mutant(
        "pixels-deletion-inserts",
        PIXELS,
        "x = torch.where(changed, flat_base[rp], flat_img[rp])",
        "x = torch.where(changed, flat_img[rp], flat_base[rp])",
        ("tests/test_faithfulness.py",),
        "deletion starts from the baseline and inserts pixels",
    ),
    Mutant(
        "pixels-image-end",
        PIXELS,
        'image_end = 0 if mode == "deletion" else k',
        'image_end = k if mode == "deletion" else 0',
        ("tests/test_faithfulness.py",),
        "the unperturbed score is put at the wrong end of the path",
    ),
    # -- pointing games -----------------------------------------------------------------------------------------
    Mutant(
        "pointing-argmin",
        POINTING,
        "best = flat.argmax(1)  # first maximum",
        "best = flat.argmin(1)  # first maximum",
        ("tests/test_metrics.py",),
        "the pointing game points with the least attributed patch",
    ),
    Mutant(
        "gridpg-signed",
        POINTING,
        "pos = maps.to(torch.float64).clamp_min(0)  # NaN stays NaN",
        "pos = maps.to(torch.float64)  # NaN stays NaN",
        ("tests/test_metrics.py",),
        "GridPG counts negative attribution",
    ),
    Mutant(
        "pointing-tolerance-linear",
        LOCALISATION,
        "near = dy[:, :, None] ** 2 + dx[:, None, :] ** 2 <= float(tolerance) ** 2  # [P, H, W]",
        "near = dy[:, :, None] + dx[:, None, :] <= float(tolerance)  # [P, H, W]",
        ("tests/test_localisation.py",),
        "the tolerant pointing game measures the margin in L1 instead of Euclidean distance",
    ),
    Mutant(
        "energy-pointing-mask-not-box",
        LOCALISATION,
        'regions = bounding_boxes(masks) if region == "box" else masks.bool()',
        "regions = masks.bool()",
        ("tests/test_localisation.py",),
        "the energy pointing game scores the mask instead of its bounding box",
    ),
    # -- de-duplication by (index, class) -----------------------------------------------------------------------
    Mutant(
        "dedup-index-only",
        "src/caap/metrics/base.py",
        "key = index * (int(cls.max()) + 1 if cls.numel() else 1) + cls",
        "key = index",
        ("tests/test_dedup.py",),
        "pairs are de-duplicated by image index only: an image's other classes are dropped",
    ),
    Mutant(
        "dedup-curves-not-reordered",
        "src/caap/metrics/curves.py",
        "return index, cls, dim_zero_cat(stored).reshape(-1, s)[order]",
        "return index, cls, dim_zero_cat(stored).reshape(-1, s)[: len(order)]",
        ("tests/test_dedup.py",),
        "curves are not de-duplicated with the values",
    ),
    Mutant(
        "dedup-counts-not-reordered",
        "src/caap/metrics/localisation.py",
        "counts = _cat(self.counts).reshape(-1, 6)[order]\n",
        "counts = _cat(self.counts).reshape(-1, 6)\n",
        ("tests/test_dedup.py",),
        "Gur segmentation counts of padded repeats are summed twice",
    ),
    Mutant(
        "dedup-sanity-not-reordered",
        "src/caap/metrics/sanity.py",
        "_cat(self.spearman).reshape(-1, s)[order],",
        "_cat(self.spearman).reshape(-1, s)[: len(order)],",
        ("tests/test_dedup.py",),
        "sanity stages are not de-duplicated with the values",
    ),
    # -- resume ---------------------------------------------------------------------------------------------------
    Mutant(
        "resume-recompute-all",
        "src/caap/lit/module.py",
        "if not self.stored_maps:  # not resuming",
        "if True:  # not resuming",
        ("tests/test_resume.py",),
        "a resumed run recomputes every stored map instead of reading it back",
    ),
    Mutant(
        "resume-recompute-stored-batches",
        "src/caap/lit/module.py",
        "if not stored.any():",
        "if True:",
        ("tests/test_resume.py",),
        "a batch with stored maps is recomputed (but marked stored, so nothing is written twice)",
    ),
    Mutant(
        "resume-partial-batch-recomputed",
        "src/caap/lit/module.py",
        "maps[todo] = self.method(self.model, images[todo], classes[todo], index[todo]).float()",
        "maps[todo] = self.method(self.model, images, classes, index)[todo].float()",
        ("tests/test_resume.py",),
        "a partly stored batch is recomputed whole",
    ),
    Mutant(
        "resume-stored-written-again",
        "src/caap/lit/callbacks.py",
        'new = ~outputs["stored"] if outputs.get("stored") is not None else None',
        "new = None",
        ("tests/test_resume.py",),
        "maps read from a killed run's files are written a second time",
    ),
    # -- layers=auto ----------------------------------------------------------------------------------------------
    Mutant(
        "auto-calibrates-on-evaluation-images",
        "src/caap/layer_selection.py",
        "Subset(dataset, calib),",
        "Subset(dataset, datamodule.indices[: len(calib)]),",
        ("tests/test_layer_selection.py",),
        "the range is chosen on images the run then evaluates",
    ),
    Mutant(
        "auto-calibration-not-excluded",
        "src/caap/layer_selection.py",
        "    datamodule.exclude(calib)\n",
        "",
        ("tests/test_layer_selection.py",),
        "the calibration images are evaluated too",
    ),
    Mutant(
        "auto-direction-reversed",
        "src/caap/layer_selection.py",
        "best = (max if higher else min)(finite",
        "best = (min if higher else max)(finite",
        ("tests/test_layer_selection.py",),
        "the worst range is chosen",
    ),
    # -- neutral contexts and reference images ------------------------------------------------------------------
    Mutant(
        "blur-kernel-scale",
        REFERENCES,
        "kernel = torch.exp(-0.5 * (coords / sigma) ** 2)",
        "kernel = torch.exp(-0.5 * (coords / (2 * sigma)) ** 2)",
        ("tests/test_caap.py",),
        "the blur's Gaussian kernel has twice the configured sigma",
    ),
    Mutant(
        "blur-border-reflect",
        REFERENCES,
        'x = F.pad(images, (half, half, half, half), mode="replicate")',
        'x = F.pad(images, (half, half, half, half), mode="reflect")',
        ("tests/test_caap.py",),
        "the blur pads by reflection instead of replicating the border",
    ),
    Mutant(
        "mean-colour-is-std",
        REFERENCES,
        "colour = model.mean.reshape(3).to(device=source.device, dtype=source.dtype)",
        "colour = model.std.reshape(3).to(device=source.device, dtype=source.dtype)",
        ("tests/test_caap.py",),
        "the mean-colour neutral uses the normalisation std",
    ),
    Mutant(
        "noise-seed-ignored",
        REFERENCES,
        'gen = torch.Generator(device="cpu").manual_seed(self.seed)',
        'gen = torch.Generator(device="cpu").manual_seed(0)',
        ("tests/test_caap.py",),
        "the noise neutral ignores its seed",
    ),
    # -- priors ---------------------------------------------------------------------------------------------------
    Mutant(
        "estimator-screens-smallest-effects",
        "src/caap/methods/caap_estimators.py",
        "order = effects.abs().topk(min(count, n), dim=-1).indices",
        "order = effects.abs().topk(min(count, n), dim=-1, largest=False).indices",
        ("tests/test_caap_estimators.py",),
        "screened / adaptive rerun the patches (windows) of smallest estimated effect",
    ),
    Mutant(
        "estimator-adaptive-effect-not-spread",
        "src/caap/methods/caap_estimators.py",
        "base + (effects / size)[..., index]",
        "base + effects[..., index]",
        ("tests/test_caap_estimators.py",),
        "adaptive gives every patch of a window the whole window's effect",
    ),
    Mutant(
        "estimator-hold-increment-skipped",
        "src/caap/methods/caap_estimators.py",
        "increments[j] = dot(j, diff(j) - diff(j - 1))",
        "increments[j] = dot(j, diff(j) - diff(j))",
        ("tests/test_caap_estimators.py",),
        "the gradient estimate of hold keeps only the injection term",
    ),
    Mutant(
        "gaussian-prior-off-centre",
        "src/caap/methods/gaussian_prior.py",
        "ys = torch.arange(gh, device=device, dtype=torch.float32) - (gh - 1) / 2",
        "ys = torch.arange(gh, device=device, dtype=torch.float32) - gh / 2",
        ("tests/test_baselines.py",),
        "the Gaussian prior is centred half a patch off",
    ),
    Mutant(
        "gaussian-prior-sigma",
        "src/caap/methods/gaussian_prior.py",
        "return torch.exp(-d2 / (2 * sigma**2))",
        "return torch.exp(-d2 / (2 * sigma))",
        ("tests/test_baselines.py",),
        "the Gaussian prior's width ignores the square of sigma",
    ),
    Mutant(
        "bootstrap-resamples-pairs",
        BOOTSTRAP,
        "sums = cluster_sums(clusters, np.asarray(terms, dtype=np.float64).reshape(len(clusters), -1))",
        "sums = cluster_sums(np.arange(len(clusters)), np.asarray(terms, dtype=np.float64).reshape(len(clusters), -1))",
        ("tests/test_stats.py",),
        "the bootstrap resamples (image, class) pairs, not images: classes of one image counted as independent",
    ),
    Mutant(
        "wilcoxon-on-pairs",
        PAIRED,
        "wilcoxon_p(per_image), int(d.size)",
        "wilcoxon_p(d), int(d.size)",
        ("tests/test_stats.py",),
        "the signed-rank test runs on per-pair differences, so an image with four classes counts four times",
    ),
    Mutant(
        "holm-not-monotone",
        PAIRED,
        "stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])",
        "stepped = (m - np.arange(m)) * p[order]",
        ("tests/test_stats.py",),
        "Holm's adjusted p-values are not made non-decreasing in the order of the raw ones",
    ),
    Mutant(
        "verdict-ignores-direction",
        PAIRED,
        "if (up and higher_is_better) or (down and not higher_is_better):",
        "if up:",
        ("tests/test_stats.py",),
        "a run is 'better' when its values are larger, also for metrics where lower is better (deletion, MIF)",
    ),
)


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | missing | timeout | error
    killer: str = ""
    seconds: float = 0.0


def _snippet_problem(mutant: Mutant) -> str | None:
    """Why `mutant` cannot be applied to the working tree's file, or None."""
    path = REPO / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    count = path.read_text().count(mutant.original)
    if count != 1:
        return f"snippet found {count} times in {mutant.file} (expected once): {mutant.original!r}"
    if mutant.original == mutant.replacement:
        return "replacement equals the original"
    missing = [t for t in mutant.tests if not (REPO / t.split("::")[0]).is_file()]
    return f"test files missing: {missing}" if missing else None


def _copy_tree(folder: Path) -> None:
    for name in COPIED:
        shutil.copytree(REPO / name, folder / name, ignore=IGNORED, symlinks=True)


def _environment(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    own = str(REPO / "src")
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != Path(own)]
    env["PYTHONPATH"] = os.pathsep.join([str(src), *rest])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return env


def _pytest(src: Path, tests: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    return subprocess.run(
        command, cwd=REPO, env=_environment(src), capture_output=True, text=True, timeout=timeout
    )


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ", 1)[0]
    return ""


def _check_copy_is_imported(root: Path) -> None:
    """Fail loudly unless the copy's `caap` (not the working tree's or an installed one) is what tests see."""
    out = subprocess.run(
        [sys.executable, "-c", "import caap, caap.paths; print(caap.__file__); print(caap.paths.CONF_DIR)"],
        cwd=REPO,
        env=_environment(root / "src"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not all(Path(p).resolve().is_relative_to(root.resolve()) for p in out):
        sys.exit(f"mutants: the tests would import {out}, not the copy under {root}; check PYTHONPATH")


def run_mutant(mutant: Mutant, workdir: Path, timeout: float) -> Outcome:
    """Apply `mutant` to a fresh copy of src/ and conf/ in `workdir`, run its tests, classify the outcome."""
    root = Path(tempfile.mkdtemp(prefix=f"{mutant.id}-", dir=workdir))
    started = time.perf_counter()
    try:
        _copy_tree(root)
        path = root / mutant.file
        text = path.read_text()
        if text.count(mutant.original) != 1:
            return Outcome(mutant, "missing", _snippet_problem(mutant) or "snippet not found in the copy")
        path.write_text(text.replace(mutant.original, mutant.replacement))
        try:
            done = _pytest(root / "src", mutant.tests, timeout)
        except subprocess.TimeoutExpired:
            return Outcome(mutant, "timeout", f"> {timeout:.0f} s", time.perf_counter() - started)
        seconds = time.perf_counter() - started
        if done.returncode == 0:
            return Outcome(mutant, "survived", "", seconds)
        if done.returncode in (1, 2):  # a failed test, or an error while collecting (e.g. an import error)
            killer = _first_failure(done.stdout) or f"pytest exit {done.returncode}"
            return Outcome(mutant, "killed", killer, seconds)
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:]
        return Outcome(mutant, "error", f"pytest exit {done.returncode}: {' '.join(tail)}", seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def baseline(mutants: Sequence[Mutant], workdir: Path, timeout: float) -> None:
    """The unmutated copy must pass every test file the mutants use (else a kill would mean nothing)."""
    root = Path(tempfile.mkdtemp(prefix="baseline-", dir=workdir))
    try:
        _copy_tree(root)
        _check_copy_is_imported(root)
        tests = sorted({t for m in mutants for t in m.tests})
        print(f"baseline: {' '.join(tests)} on an unmutated copy ...", flush=True)
        done = _pytest(root / "src", tests, timeout * 4)
        if done.returncode != 0:
            print(done.stdout[-4000:] + done.stderr[-2000:])
            sys.exit("mutants: the tests fail on the unmutated source; fix them before judging mutants")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def print_table(outcomes: Sequence[Outcome]) -> None:
    width = max(len(o.mutant.id) for o in outcomes)
    print(f"\n{'mutant':<{width}}  {'status':<8}  {'s':>5}  killed by / reason")
    for o in outcomes:
        print(f"{o.mutant.id:<{width}}  {o.status:<8}  {o.seconds:5.0f}  {o.killer}")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("killed", "survived", "missing", "timeout")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"\n{len(outcomes)} mutants: {summary}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="check that every snippet is found; run nothing")
    parser.add_argument("--keep-going", action="store_true", help="run the others when snippets are missing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at the same time (default 1)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default 900)")
    args = parser.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    if len(set(ids)) != len(ids):
        sys.exit("mutants: duplicate mutant ids")
    selected = list(MUTANTS)
    if args.only:
        unknown = sorted(set(args.only) - set(ids))
        if unknown:
            sys.exit(f"mutants: unknown ids {unknown}; see --list")
        selected = [m for m in MUTANTS if m.id in args.only]
    if args.list:
        for m in selected:
            print(f"{m.id:<40} {m.file}  [{' '.join(m.tests)}]  {m.bug}")
        return 0

    problems = {m.id: p for m in selected if (p := _snippet_problem(m))}
    for mid, problem in problems.items():
        print(f"SNIPPET NOT FOUND  {mid}: {problem}", file=sys.stderr)
    if args.check:
        print(f"{len(selected) - len(problems)} of {len(selected)} snippets found")
        return 1 if problems else 0
    if problems and not args.keep_going:
        sys.exit(f"mutants: {len(problems)} snippets not found (code moved?): refresh them in {__file__}")

    runnable = [m for m in selected if m.id not in problems]
    with tempfile.TemporaryDirectory(prefix="caap-mutants-") as tmp:
        workdir = Path(tmp)
        if not args.no_baseline and runnable:
            baseline(runnable, workdir, args.timeout)
        else:
            root = workdir / "probe"
            _copy_tree(root)
            _check_copy_is_imported(root)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_mutant, m, workdir, args.timeout) for m in runnable]
            outcomes = {m.id: Outcome(m, "missing", problems[m.id]) for m in selected if m.id in problems}
            for future in futures:
                o = future.result()
                print(f"{o.mutant.id}: {o.status} {o.killer}".rstrip(), flush=True)
                outcomes[o.mutant.id] = o
    ordered = [outcomes[m.id] for m in selected]
    print_table(ordered)
    return 0 if all(o.status == "killed" for o in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
