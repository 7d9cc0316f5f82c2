"""`caap.report.comparison` on run folders built from planted per-pair values: marks only where a paired test
says so, identical runs tied at exactly 0, runs of different pairs never ranked, old folders noted, Holm
across the table, and the mean-rank summary; the tables and page show it."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from caap.report import build_report, load_runs
from caap.report.table import report_statistics, to_csv, to_markdown
from caap.stats import holm, mean_interval

HIGHER = {"insertion": True, "deletion": False, "srg": True, "ratio": True}


def pair_keys(images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(index, class) of 1-3 classes per image, sorted as per_image.csv is."""
    rng = np.random.default_rng(seed)
    index = np.concatenate([[i] * int(rng.integers(1, 4)) for i in range(images)])
    cls = np.concatenate([np.arange((index == i).sum()) * 2 + i % 2 for i in range(images)])
    return index, cls


def write_run(
    folder: Path,
    method: str,
    values: dict[str, np.ndarray],
    keys: tuple[np.ndarray, np.ndarray],
    per_pair_file: bool = True,
    reported: dict[str, float] | None = None,
) -> Path:
    """A run folder as `caap.run` writes it: metrics.json (means, directions, CIs), per_image.csv, overrides."""
    index, cls = keys
    folder.mkdir(parents=True)
    means = {n: float(np.nanmean(v)) for n, v in values.items()} | (reported or {})
    ci = {n: list(mean_interval(v, index)) for n, v in values.items()}
    written = {
        "metrics": means,
        "higher_is_better": {n: HIGHER[n] for n in values},
        "ci": ci,
        "num_maps": len(index),
        "finished": True,
    }
    (folder / "metrics.json").write_text(json.dumps(written))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(f"- method={method}\n")
    if per_pair_file:
        with open(folder / "per_image.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["index", "class", *values])
            for p in range(len(index)):
                writer.writerow([index[p], cls[p], *(repr(float(v[p])) for v in values.values())])
    return folder


@pytest.fixture
def planted(tmp_path: Path) -> list[Path]:
    """caap, random and a second random with identical values, 30 images: caap clearly better on srg and
    deletion; insertion equal in distribution (caap a hair higher, not significant)."""
    keys = pair_keys(30)
    rng = np.random.default_rng(1)
    m = len(keys[0])
    image_effect = rng.normal(0, 0.05, 30)[keys[0]]
    random = {
        "srg": -0.05 + image_effect + rng.normal(0, 0.2, m),
        "deletion": 0.6 + image_effect + rng.normal(0, 0.1, m),
        "insertion": 0.5 + image_effect + rng.normal(0, 0.1, m),
    }
    caap = {
        "srg": 0.75 + image_effect + rng.normal(0, 0.1, m),
        "deletion": 0.1 + image_effect + rng.normal(0, 0.05, m),
        "insertion": random["insertion"][rng.permutation(m)] + 0.002,
    }
    return [
        write_run(tmp_path / "0_caap", "caap", caap, keys),
        write_run(tmp_path / "1_random", "random", random, keys),
        write_run(tmp_path / "2_random", "random", {k: v.copy() for k, v in random.items()}, keys),
    ]


def test_identical_runs_differ_by_exactly_zero_and_are_tied(planted: list[Path]) -> None:
    records = load_runs(planted[1], planted[2])
    stats = report_statistics(records)
    assert len(stats.comparisons) == 3  # one per metric, leader vs the other
    for c in stats.comparisons:
        assert (c.result.difference, c.result.low, c.result.high, c.result.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert c.verdict == "tied" and stats.marks[c.metric] == {0: "tied", 1: "tied"}
    md = to_markdown(records, stats)
    assert "**" not in md.split("### Paired")[0].split("\n", 2)[2]  # nothing bold in the table rows
    assert md.count("(tied)") == 6 and "| +0.0000 | [+0.0000, +0.0000] | 1 | 1 | tied |" in md


def test_caap_is_marked_best_only_where_it_is_significantly_better(planted: list[Path]) -> None:
    records = load_runs(*planted)
    assert [r.label for r in records] == ["caap", "random", "random #2"]
    stats = report_statistics(records)
    # srg: higher is better; deletion: lower is better; caap beats both random runs on both
    assert stats.marks["srg"] == {0: "best"} and stats.marks["deletion"] == {0: "best"}
    srg = [c for c in stats.comparisons if c.metric == "srg"]
    assert [(c.leader, c.other, c.verdict) for c in srg] == [(0, 1, "better"), (0, 2, "better")]
    assert all(c.result.low > 0 for c in srg)
    deletion = [c for c in stats.comparisons if c.metric == "deletion"]
    assert all(c.result.high < 0 and c.verdict == "better" for c in deletion)  # lower is better
    # insertion: the leader by mean is not significantly better: all three tied
    assert stats.marks["insertion"] == {0: "tied", 1: "tied", 2: "tied"}
    # Holm across every comparison of the table
    p = np.array([c.result.p_value for c in stats.comparisons])
    assert [c.p_holm for c in stats.comparisons] == pytest.approx(holm(p))
    # mean rank over the three metrics: caap first; the two identical random runs share ranks
    ranks = {r.run: r for r in stats.ranks}
    assert ranks[0].mean < ranks[1].mean == ranks[2].mean and ranks[0].high < ranks[1].low
    md = to_markdown(records, stats)
    assert f"**{records[0].metrics['srg']:.4f}**" in md and "### Mean rank" in md and "leader better" in md
    table = list(csv.DictReader(io.StringIO(to_csv(records, stats))))
    assert [r["best_srg"] for r in table] == ["1", "0", "0"]
    assert [r["tied_insertion"] for r in table] == ["1", "1", "1"]
    assert float(table[0]["srg_ci_low"]) == pytest.approx(records[0].ci["srg"][0])
    assert float(table[0]["mean_rank"]) == pytest.approx(ranks[0].mean)


def test_runs_of_different_pairs_are_never_ranked_against_each_other(
    planted: list[Path], tmp_path: Path
) -> None:
    keys = pair_keys(29)  # one image fewer
    rng = np.random.default_rng(2)
    other = write_run(tmp_path / "3_rise", "rise", {"srg": 5.0 + rng.normal(0, 0.1, len(keys[0]))}, keys)
    records = load_runs(*planted, other)
    stats = report_statistics(records)
    assert stats.groups == [[0, 1, 2], [3]]
    assert stats.notes[0].startswith("warning: the runs scored different (image, class) pairs")
    assert all(3 not in (c.leader, c.other) for c in stats.comparisons)
    assert all(3 not in marks for marks in stats.marks.values()) and stats.marks["srg"] == {0: "best"}
    assert all(r.run != 3 for r in stats.ranks)
    md = to_markdown(records, stats)
    assert "| pairs |" in md.splitlines()[0] and "| rise | rise |  | B |" in md
    assert "> warning: the runs scored different" in md


def test_runs_without_per_pair_values_or_with_dataset_level_values_are_not_tested(tmp_path: Path) -> None:
    keys = pair_keys(20)
    rng = np.random.default_rng(3)
    values = [
        {"srg": rng.normal(s, 0.1, len(keys[0])), "ratio": rng.uniform(0, 1, len(keys[0]))} for s in (1, 0)
    ]
    # `ratio` reports a dataset-level value (e.g. summed correct / summed labelled), not the per-pair mean
    runs = [
        write_run(tmp_path / f"{i}_m{i}", f"m{i}", v, keys, reported={"ratio": 0.5 + i / 10})
        for i, v in enumerate(values)
    ]
    old = write_run(tmp_path / "2_old", "old", values[0], keys, per_pair_file=False)
    records = load_runs(*runs, old)
    stats = report_statistics(records)
    assert stats.unpaired == [2] and {c.metric for c in stats.comparisons} == {"srg"}
    assert "ratio" not in stats.marks and stats.marks["srg"] == {0: "best"}
    assert any(n.startswith("no per-pair values (per_image.csv) in old") for n in stats.notes)
    assert any(n.startswith("not paired-tested") and n.endswith("ratio") for n in stats.notes)
    assert {r.metrics for r in stats.ranks} == {("srg",)}


def test_report_files_and_page_show_the_statistics(planted: list[Path], tmp_path: Path) -> None:
    paths = build_report(planted, tmp_path / "report", wandb=False)
    page = paths["html"].read_text()
    assert (
        '<td class="best">' in page and '<td class="tied">' in page and "Mean rank over the metrics" in page
    )
    assert "Paired comparisons" in page and '<span class="ci">[' in page
    rows = list(csv.DictReader(paths["comparisons"].open()))
    assert {r["verdict"] for r in rows} == {"better", "tied"} and len(rows) == 6
    assert all(math.isfinite(float(r["p_holm"])) for r in rows)
    assert "significantly best" in paths["md"].read_text()
