"""tests/figures.py, the figure check the example, demo and notebook tests use: it fails the
figures that PNG byte sizes passed (three titled empty axes, an all-NaN heatmap with a colour
bar, a panel with only a reference line), passes real ones, and reads back what was drawn."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from figures import assert_figure_draws_data, figure_saved_as, panel_data, panel_problems, record_figures  # noqa: E402


def test_blank_and_nan_figures_fail_and_their_pngs_are_large(tmp_path):
    fig, axes = plt.subplots(1, 3)
    for i, ax in enumerate(axes):
        ax.set_title(f"panel {i}")
    fig.savefig(tmp_path / "blank.png", dpi=110)
    assert (tmp_path / "blank.png").stat().st_size > 10_000          # what the old checks accepted
    assert len(panel_problems(fig)) == 4
    with pytest.raises(AssertionError, match="panel 0 .* draws no finite, non-constant data"):
        assert_figure_draws_data(fig)

    fig, ax = plt.subplots()
    fig.colorbar(ax.imshow(np.full((8, 8), np.nan)), ax=ax)
    with pytest.raises(AssertionError, match="no panel draws data"):
        assert_figure_draws_data(fig)

    fig, ax = plt.subplots()
    ax.axhline(0.0)
    ax.axvline(0.17)
    ax.plot([1, 2, 3], [2.0, 2.0, 2.0])                                 # constant
    assert panel_problems(fig) == ["panel 0 ('') draws no finite, non-constant data (1 arrays, 3 values)",
                                   "no panel draws data"]
    ax.plot([1, 2], [np.inf, 1.0])
    assert any("infinite" in p for p in panel_problems(fig))
    plt.close("all")


def test_real_figures_pass_and_their_arrays_are_read_back(monkeypatch, tmp_path):
    saved = record_figures(monkeypatch)
    fig, axes = plt.subplots(1, 4)
    img = np.arange(12.0).reshape(3, 4)
    fig.colorbar(axes[0].imshow(img), ax=axes[0])
    axes[1].errorbar([0, 1, 2], [1.0, 3.0, np.nan], yerr=[0.1, 0.1, 0.1], label="x")
    axes[1].axhline(0)
    axes[2].bar([0, 1], [5.0, 7.0])
    axes[3].scatter([0, 1, 2], [4.0, 5.0, 6.0], c=[1.0, 2.0, 3.0])
    axes[3].set_axis_off()
    blank = fig.add_axes((0.9, 0.9, 0.05, 0.05))
    blank.set_axis_off()                                               # a deliberate blank passes
    fig.savefig(tmp_path / "ok.png")
    assert figure_saved_as(saved, "ok.png") is fig
    assert_figure_draws_data(fig)
    data = panel_data(fig)
    assert len(data) == 5                                              # the colour bar is not a panel
    np.testing.assert_array_equal(data[0][1][0], img.ravel())
    np.testing.assert_array_equal(data[2][1][0], [5.0, 7.0])
    np.testing.assert_array_equal(data[3][1][0], [4.0, 5.0, 6.0])
    assert data[4][1] == []
    plt.close("all")
