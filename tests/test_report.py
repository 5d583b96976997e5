import json
import math

import pytest

from pos2distill.errors import UserError
from pos2distill.report import load_summaries, plot_positions, summarize, to_markdown, wilson_interval, write_summaries


def _records(position_correct):
    out = []
    for position, outcomes in position_correct.items():
        out += [{"gold_idx": position, "correct": float(c)} for c in outcomes]
    return out


def test_wilson_interval_matches_formula():
    low, high = wilson_interval(30, 100)
    # independent evaluation of the Wilson score interval, z = 1.96
    z, n, p = 1.96, 100, 0.3
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert low == pytest.approx(100 * (centre - half))
    assert high == pytest.approx(100 * (centre + half))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(100.0)


def test_summarize_average_and_gap():
    s = summarize(_records({0: [1, 1, 1, 0], 1: [0, 0, 1, 0], 2: [1, 0, 1, 0]}), "m", 3)
    assert s["accuracy"] == {0: 75.0, 1: 25.0, 2: 50.0}
    assert s["average"] == pytest.approx(50.0)
    assert s["gap"] == pytest.approx(50.0)
    assert s["n"] == {0: 4, 1: 4, 2: 4}
    low, high = s["ci95"][0]
    assert low < 75.0 < high


def test_tables_and_plot_roundtrip(tmp_path):
    a = summarize(_records({0: [1, 0], 1: [0, 0]}), "base", 2)
    b = summarize(_records({0: [1, 1], 1: [1, 0]}), "trained", 2)
    paths = write_summaries([a, b], str(tmp_path / "cmp"))
    assert [p.rsplit(".", 1)[1] for p in paths] == ["csv", "md", "json"]
    md = to_markdown([a, b])
    assert "| base | 50.0 | 0.0 | 25.0 | 50.0 |" in md
    csv_lines = open(paths[0]).read().splitlines()
    assert csv_lines[0].startswith("model,total_docs,position")
    assert len(csv_lines) == 1 + 4
    loaded = load_summaries(paths[2])
    assert loaded[1]["accuracy"][0] == 100.0
    png = plot_positions(loaded, str(tmp_path / "cmp.png"))
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    json.loads(open(paths[2]).read())



def test_plot_labels_the_bands_and_keeps_identical_models_apart(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k))[1])
    same = {0: [1, 0, 0], 1: [1, 1, 0], 2: [0, 0, 0]}  # three models with the same scores
    summaries = [summarize(_records(same), label, 3) for label in ("base", "p2d", "seqkd")]
    plot_positions(summaries, str(tmp_path / "same.png"))
    (ax,) = saved[0].axes
    curves = [line for line in ax.get_lines() if line.get_label() and not line.get_label().startswith("_")]
    assert len(curves) == 3
    assert len({line.get_linestyle() for line in curves}) == 3 and len({line.get_marker() for line in curves}) == 3
    xs = [tuple(line.get_xdata()) for line in curves]
    assert len(set(xs)) == 3 and all(abs(x[0]) < 0.2 for x in xs)  # shifted apart, still at their position
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any("95% interval" in text for text in legend)
    assert "95%" in ax.get_ylabel()
    assert all(band.get_alpha() <= 0.1 for band in ax.collections)  # light: the others show through


def test_missing_summary_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "summary_20docs.json")
    with pytest.raises(UserError, match="summary_20docs.json: no such file"):
        load_summaries(missing)
