"""Which run is best, said with statistics: runs that scored the same (image, class) pairs are compared pair by
pair (`caap.stats.paired`), the leader of each metric is marked best only where it beats every other run of its
group significantly, and each group gets a mean-rank summary over its metrics (`caap.stats.ranks`).

Groups: runs whose per_image.csv hold exactly the same pairs. Runs of different groups are reported side by
side with a warning and never ranked against each other; runs without per-pair values (older run folders) are
reported without tests or marks. A metric is paired-tested where its value is the mean of its per-pair values
(not, e.g., a dataset-level ratio of summed counts). See docs/statistics.md.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from caap.report.runs import RunRecord
from caap.stats import (
    DEFAULT_SETTINGS,
    BootstrapSettings,
    PairedResult,
    holm,
    mean_ranks,
    paired_difference,
    verdict,
)


@dataclass(frozen=True)
class Comparison:
    """The leader of `metric` (by value, in the metric's direction) against `other` (record indices) in one
    group: `result` is leader minus other, `p_holm` its Holm-adjusted p-value across the report, `verdict`
    'better' (the leader significantly better) or 'tied' ('worse' only where the per-pair means disagree with
    the values' order, which undefined pairs can cause)."""

    metric: str
    group: int
    leader: int
    other: int
    result: PairedResult
    p_holm: float
    verdict: str


@dataclass(frozen=True)
class RankRow:
    """A run's mean rank over the `metrics` of its `group` (1 = best) and its bootstrap CI."""

    group: int
    run: int
    mean: float
    low: float
    high: float
    metrics: tuple[str, ...]


@dataclass
class ReportStatistics:
    """Everything a report says beyond the values: the comparable groups (record indices), the runs without
    per-pair values, the paired comparisons, the marks (`{metric: {record index: 'best' | 'tied'}}`), the
    mean-rank rows, and the warnings and notes to print."""

    groups: list[list[int]] = field(default_factory=list)
    unpaired: list[int] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    marks: dict[str, dict[int, str]] = field(default_factory=dict)
    ranks: list[RankRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def group_of(self, run: int) -> str:
        """The letter of the run's group ('A', 'B', ...), '' for a run without per-pair values."""
        for g, members in enumerate(self.groups):
            if run in members:
                return group_name(g)
        return ""

    def mark(self, metric: str, run: int) -> str:
        """'best', 'tied' or '' for the run's value of `metric`."""
        return self.marks.get(metric, {}).get(run, "")


def group_name(group: int) -> str:
    return string.ascii_uppercase[group % 26] + ("" if group < 26 else str(group // 26))


def pair_groups(records: Sequence[RunRecord]) -> tuple[list[list[int]], list[int]]:
    """Record indices grouped by identical scored pairs (first-seen order), and those without per-pair values."""
    groups: list[list[int]] = []
    unpaired: list[int] = []
    for i, record in enumerate(records):
        if record.pairs is None:
            unpaired.append(i)
            continue
        for members in groups:
            pairs = records[members[0]].pairs
            if pairs is not None and pairs.same_pairs(record.pairs):
                members.append(i)
                break
        else:
            groups.append([i])
    return groups, unpaired


def is_pair_mean(record: RunRecord, metric: str) -> bool:
    """Whether the run's value of `metric` is the mean of its finite per-pair values (what a paired test of
    per-pair values compares)."""
    value = record.metrics.get(metric, math.nan)
    if record.pairs is None or metric not in record.pairs.values or not math.isfinite(value):
        return False
    column = record.pairs.values[metric]
    finite = column[np.isfinite(column)]
    return finite.size > 0 and math.isclose(float(finite.mean()), value, rel_tol=1e-9, abs_tol=1e-12)


def testable_metrics(records: Sequence[RunRecord], members: list[int], names: list[str]) -> list[str]:
    """The metrics every run of a group can be paired-tested on."""
    return [n for n in names if all(is_pair_mean(records[i], n) for i in members)]


def leader_order(records: Sequence[RunRecord], members: list[int], metric: str, higher: bool) -> list[int]:
    """The group's runs best first by their value of `metric` (stable: ties keep the report's order)."""
    sign = -1.0 if higher else 1.0
    return sorted(members, key=lambda i: sign * records[i].metrics[metric])


def compare_runs(
    records: Sequence[RunRecord],
    higher_is_better: dict[str, bool],
    names: list[str],
    settings: BootstrapSettings = DEFAULT_SETTINGS,
) -> ReportStatistics:
    """Group the runs, compare each metric's leader with every other run of its group, Holm-correct all those
    comparisons together, mark the leaders and rank the runs of each group over their tested metrics (metric
    names without a `/`: sub-results such as sanity stages are tested, not ranked)."""
    stats = ReportStatistics()
    stats.groups, stats.unpaired = pair_groups(records)
    if len(stats.groups) > 1:
        listing = "; ".join(
            f"{group_name(g)}: {', '.join(records[i].label for i in members)}"
            for g, members in enumerate(stats.groups)
        )
        stats.notes.append(
            f"warning: the runs scored different (image, class) pairs ({listing}); each group is compared and "
            "ranked on its own, runs of different groups are never ranked against each other"
        )
    if stats.unpaired:
        stats.notes.append(
            "no per-pair values (per_image.csv) in "
            + ", ".join(records[i].label for i in stats.unpaired)
            + ": reported without paired tests, marks or ranks"
        )
    raw: list[tuple[str, int, int, int, PairedResult]] = []
    untested: set[str] = set()
    for g, members in enumerate(stats.groups):
        if len(members) < 2:
            continue
        tested = testable_metrics(records, members, names)
        untested.update(n for n in names if n not in tested)
        pairs = {i: p for i in members if (p := records[i].pairs) is not None}
        for metric in tested:
            order = leader_order(records, members, metric, higher_is_better.get(metric, True))
            leader, a = order[0], pairs[order[0]].values[metric]
            for other in order[1:]:
                result = paired_difference(a, pairs[other].values[metric], pairs[leader].index, settings)
                raw.append((metric, g, leader, other, result))
        ranked = [n for n in tested if "/" not in n]
        if ranked:
            stats.ranks += group_ranks(records, g, members, ranked, higher_is_better, settings)
    if untested:
        stats.notes.append(
            "not paired-tested (the value is not the mean of per-pair values, e.g. a dataset-level ratio, or a "
            "run lacks them): " + ", ".join(n for n in names if n in untested)
        )
    adjusted = holm(np.array([r[4].p_value for r in raw]))
    for (metric, g, leader, other, result), p in zip(raw, adjusted, strict=True):
        said = verdict(result, float(p), higher_is_better.get(metric, True))
        stats.comparisons.append(Comparison(metric, g, leader, other, result, float(p), said))
    mark_leaders(stats)
    return stats


def mark_leaders(stats: ReportStatistics) -> None:
    """Per metric and group: the leader is 'best' when it is significantly better than every other run (so in
    particular the runner-up); otherwise the leader and every run it does not beat significantly are 'tied'."""
    by_key: dict[tuple[str, int], list[Comparison]] = {}
    for c in stats.comparisons:
        by_key.setdefault((c.metric, c.group), []).append(c)
    for (metric, _), comparisons in by_key.items():
        leader = comparisons[0].leader
        tied = [c.other for c in comparisons if c.verdict != "better"]
        marks = stats.marks.setdefault(metric, {})
        if tied:
            marks.update({i: "tied" for i in (leader, *tied)})
        else:
            marks[leader] = "best"


def group_ranks(
    records: Sequence[RunRecord],
    group: int,
    members: list[int],
    metrics: list[str],
    higher_is_better: dict[str, bool],
    settings: BootstrapSettings,
) -> list[RankRow]:
    """Mean ranks of the group's runs over `metrics`, images resampled jointly for every run and metric."""
    pairs = [p for i in members if (p := records[i].pairs) is not None]
    values = np.stack([np.stack([p.values[m] for m in metrics]) for p in pairs])  # [K, N, M]
    higher = np.array([higher_is_better.get(m, True) for m in metrics])
    ranks = mean_ranks(values, pairs[0].index, higher, settings)
    return [
        RankRow(group, run, float(ranks.mean[k]), float(ranks.low[k]), float(ranks.high[k]), tuple(metrics))
        for k, run in enumerate(members)
    ]
