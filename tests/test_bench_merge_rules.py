"""The merge-rule benchmark: curves per rule, the comparison at equal speed, and its reports."""

import pytest
import torch
from tiny import images, make

import tome
from tome_bench.merge_rules import (
    NOTES_MARKER,
    Point,
    Setup,
    Subject,
    compare,
    dinov2_curve_report,
    measure,
    merge_rules_report,
    plot,
    retrieval_scorer,
    scores_at_speed,
    verdict,
    write_keeping_notes,
)

SETUP = Setup("test CPU", "python -m tome_bench.merge_rules", "2026-01-01", "float32", 2, 2, 3, 2, 0)


def _point(rule: str, r: int, speed: float, scores: list[float]) -> Point:
    return Point(rule, r, speed, 0.01, {"cosine": torch.tensor(scores)})


def test_the_other_rule_is_read_at_the_speeds_the_first_reached():
    base = [
        _point("tome", 0, 10, [1, 1]),
        _point("tome", 4, 20, [0.8, 0.6]),
        _point("tome", 8, 30, [0.5, 0.3]),
    ]
    other = [
        _point("mlerp", 0, 10, [1, 1]),
        _point("mlerp", 4, 18, [0.9, 0.7]),
        _point("mlerp", 8, 28, [0.4, 0.2]),
    ]
    # 20 img/s lies a fifth of the way from mlerp's 18 to 28: 0.8 * [0.9, 0.7] + 0.2 * [0.4, 0.2].
    assert torch.allclose(scores_at_speed(other, 4, 20, "cosine"), torch.tensor([0.8, 0.6]))
    assert scores_at_speed(other, 8, 29, "cosine") is None  # faster than mlerp was measured
    # A noisy curve whose speed falls at r=12: 16 img/s is read between r=8 and r=12, not r=0 and 4.
    noisy = other + [_point("mlerp", 12, 15, [0.1, 0.1])]
    assert torch.allclose(
        scores_at_speed(noisy, 12, 16, "cosine"), torch.tensor([0.4, 0.2]) / 13 + 0.1 * 12 / 13
    )
    (row,) = compare(base, other, "cosine")  # 30 img/s is out of mlerp's range, r=0 is no comparison
    assert (row.r, row.speed) == (4, 20)
    assert row.diff == pytest.approx(0.0, abs=1e-6) and row.two_se == pytest.approx(0.0, abs=1e-6)
    text = verdict("mlerp", "tome", "cosine", [row])
    assert "better at 0, worse at 0, within noise at 1 of 1 speeds" in text


def test_measure_times_and_scores_every_rule_at_every_r():
    model = tome.patch(make("dinov2"))
    views = images(model, batch=6, seed=3)
    with torch.inference_mode():
        gallery = model(views[::2])
    subject = Subject(
        "tiny DINOv2",
        model,
        views,
        retrieval_scorer(gallery, torch.tensor([0, 0, 1, 1, 2, 2])),
        ("cosine", "recall@1"),
        [0, 2, 4],
    )
    measure(subject, tome.MERGE_RULES, batch=4, rounds=2)
    tome_curve, mlerp_curve = subject.curves["tome"], subject.curves["mlerp"]
    assert [p.r for p in tome_curve] == [p.r for p in mlerp_curve] == [0, 2, 4]
    assert tome_curve[0].images_per_s == mlerp_curve[0].images_per_s  # r=0 is one timed variant
    assert tome_curve[0].mean("cosine") == pytest.approx(1.0)
    assert all(p.images_per_s > 0 and p.spread >= 0 for p in tome_curve + mlerp_curve)
    assert tome_curve[2].mean("cosine") < 1.0
    assert not torch.equal(tome_curve[2].scores["cosine"], mlerp_curve[2].scores["cosine"])
    # The other rule's time per batch is the first rule's plus its merge steps' extra time.
    assert len(subject.costs["mlerp"]) == 2 * 2  # whole-model ratios: rounds x r values above 0
    merges = subject.merge_seconds
    for tome_point, mlerp_point in zip(tome_curve[1:], mlerp_curve[1:], strict=True):
        extra = merges["mlerp"][tome_point.r] - merges["tome"][tome_point.r]
        assert 4 / mlerp_point.images_per_s == pytest.approx(4 / tome_point.images_per_s + extra)

    report = merge_rules_report([subject], tome.MERGE_RULES, SETUP, floor=0.9999)
    assert "| r | tome img/s | mlerp img/s | mlerp time / tome time | tome cosine | mlerp cosine |" in report
    assert "Computed verdict: cosine: " in report and "Computed verdict: recall@1: " in report
    assert "test CPU" in report and "0.9999" in report
    assert "Merge steps of one forward pass of the batch, ms: r=2: tome " in report
    assert "mlerp time / tome time pooled over every r > 0 and round (a check): " in report
    curve = dinov2_curve_report(subject, "tome", SETUP)
    assert f"| 4 | {tome.token_counts(17, 4, 4, 1)[-1]} |" in curve


def test_reports_keep_the_notes_below_the_marker(tmp_path):
    path = tmp_path / "merge-rules.md"
    write_keeping_notes(path, "# first run")
    path.write_text(path.read_text() + "Hand-written reading of the numbers.\n")
    write_keeping_notes(path, "# second run")
    text = path.read_text()
    assert text.startswith("# second run") and "first run" not in text
    assert text.endswith(f"{NOTES_MARKER}\n\nHand-written reading of the numbers.\n")


def test_plot_has_one_panel_per_metric(tmp_path):
    model = tome.patch(make("dinov2"))
    curves = {
        rule: [_point(rule, 0, 10, [1.0]), _point(rule, 4, 20 + i, [0.9 - i / 10])]
        for i, rule in enumerate(tome.MERGE_RULES)
    }
    subject = Subject(
        "tiny",
        model,
        images(model),
        retrieval_scorer(torch.zeros(1, 1), torch.zeros(1)),
        ("cosine",),
        [0, 4],
        curves,
    )
    plot([subject], tome.MERGE_RULES, tmp_path / "img" / "plot.png", "title")
    assert (tmp_path / "img" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
