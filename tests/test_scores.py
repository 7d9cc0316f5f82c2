"""`caap.scores`: the one target-score definition, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from caap.scores import (
    Outcomes,
    check_score,
    class_scores,
    curve_values,
    score_curves,
    target_outcomes,
    target_score,
)

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])


def test_target_score_known_answers() -> None:
    t = torch.tensor([0, 1])
    e = LOGITS.exp()
    softmax = e / e.sum(1, keepdim=True)
    expected = {
        ("logit", False): torch.tensor([2.0, 1.5]),
        ("prob", False): softmax[[0, 1], [0, 1]],
        ("logprob", False): softmax[[0, 1], [0, 1]].log(),
        ("prob", True): torch.tensor([1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-1.5))]),
        ("logprob", True): torch.tensor([-math.log1p(math.exp(-2.0)), -math.log1p(math.exp(-1.5))]),
    }
    for (score, multilabel), value in expected.items():
        got = target_score(LOGITS, t, score, multilabel)
        assert got.shape == (2,)
        torch.testing.assert_close(got, value, rtol=0, atol=1e-6)
    delta = target_score(LOGITS, t, "delta", False, reference_logit=torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(delta, torch.tensor([1.0, 2.5]))
    with pytest.raises(ValueError, match="delta"):
        target_score(LOGITS, t, "delta", False)
    with pytest.raises(ValueError, match="margin"):
        target_score(LOGITS, t, "margin", False)  # type: ignore[arg-type]


def test_target_score_several_targets_per_row() -> None:
    targets = torch.tensor([[0, 2], [1, 1]])
    for score in ("logit", "prob", "logprob"):
        for multilabel in (False, True):
            got = target_score(LOGITS, targets, score, multilabel)
            assert got.shape == (2, 2)
            for k in range(2):
                torch.testing.assert_close(got[:, k], target_score(LOGITS, targets[:, k], score, multilabel))
            torch.testing.assert_close(
                got, class_scores(LOGITS, score, multilabel).gather(1, targets), rtol=0, atol=1e-7
            )
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(
        target_score(LOGITS, targets, "delta", False, ref), LOGITS.gather(1, targets) - ref
    )


def test_check_score_names_key_and_choices() -> None:
    assert check_score("prob", ("prob", "logit")) == "prob"
    with pytest.raises(ValueError, match=r"method.score='logprob'.*allowed.*prob.*logit"):
        check_score("logprob", ("prob", "logit"), key="method.score")


def test_outcomes_and_curve_transforms() -> None:
    out = target_outcomes(LOGITS, torch.tensor([0, 0]), multilabel=False)
    torch.testing.assert_close(out.top1, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out.logit, torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(curve_values(out, "prob"), LOGITS.softmax(-1)[:, 0])
    with pytest.raises(ValueError, match="aopc"):
        curve_values(out, "aopc")
    full = Outcomes(torch.tensor([2.0]), torch.tensor([math.log(0.8)]), torch.tensor([1.0]))
    pert = Outcomes(torch.tensor([[1.0]]), torch.tensor([[math.log(0.2)]]), torch.tensor([[0.0]]))
    torch.testing.assert_close(score_curves(full, pert, "aopc"), torch.tensor([[0.0, 0.6]]))
    torch.testing.assert_close(score_curves(full, pert, "log_odds"), torch.tensor([[0.0, math.log(4.0)]]))
    torch.testing.assert_close(score_curves(full, pert, "top1"), torch.tensor([[1.0, 0.0]]))
