"""geomjobs.analysis: the library the analysis notebooks (``notebooks/``) call.

Pure functions over pandas DataFrames, pyarrow Tables and DuckDB relations:

- reading: :func:`read_ok` (ok rows of a dataset, local or gs://), :func:`duckdb_view`
- statistics: :func:`level_sets` (equal-width bins, counts, means with 95 % CIs; in DuckDB for a
  relation), :func:`on_manifold_mask`, :func:`two_sample` (Welch t, Mann-Whitney U, Cohen's d,
  rank-biserial r), :func:`correlations`
- sample-set metrics: :func:`vendi_score`, :func:`frechet_distance` (from :mod:`geomjobs.metrics`)
- figures: :func:`slice_heatmap` (grid2d / plane3 datasets), :func:`image_grid`, :func:`save_figure`,
  :func:`save_png` (the one PNG writer: local paths and gs://)
- trajectories: per-step summaries of trajectory datasets (:mod:`.trajectories`)
- notebooks: :func:`notebook_env` (size and output folder); runner: ``python -m
  geomjobs.analysis.run_notebooks``
"""
from geomjobs.analysis.io import arrow_dataset, duckdb_view, read_ok
from geomjobs.analysis.notebook import notebook_env
from geomjobs.analysis.plots import image_grid, image_mosaic, save_figure, save_png, slice_grid, slice_heatmap
from geomjobs.analysis.stats import ci95_halfwidth, correlations, format_p, level_set_index, level_sets, on_manifold_mask, two_sample
from geomjobs.analysis.trajectories import (
    DESCRIPTORS,
    attach_labels,
    final_rows,
    first_separation,
    separation,
    step_summary,
)
from geomjobs.metrics import frechet_distance, vendi_score

__all__ = ["arrow_dataset", "ci95_halfwidth", "correlations", "duckdb_view", "format_p", "frechet_distance", "image_grid",
           "image_mosaic", "level_set_index", "level_sets", "notebook_env", "on_manifold_mask", "read_ok", "save_figure",
           "save_png", "slice_grid", "slice_heatmap", "two_sample", "vendi_score",
           "DESCRIPTORS", "attach_labels", "final_rows", "first_separation", "separation", "step_summary"]   # trajectories
