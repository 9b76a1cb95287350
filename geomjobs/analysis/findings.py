"""The notebooks' findings as data: each notebook measures the paper's claims it tests, returns
them as a small dict (``findings``) and writes it as ``verdicts.json`` beside its figures; the
test suite asserts them at the small defaults and ``make notebooks`` turns the full-size ones
into the table of ``docs/findings.md``.

A finding is one of two kinds:

- ``direction``: a signed statistic with its standard error. ``measured`` is the effect
  (a difference of means, a correlation), ``z`` the effect in units of its standard error
  (Welch's t, a paired t, the Fisher z of a rank correlation). The direction is resolved when
  ``|z| >= margin`` (:data:`MARGIN` = 3: a statistic with no true effect gets past it in a given
  direction with probability about 0.13 % under the normal approximation, 0.2 % for a t with
  50 degrees of freedom); the verdict is ``reproduced`` when the resolved sign is the paper's,
  ``opposite`` when it is the other, ``unresolved`` otherwise. ``paper_sign`` 0 stands for a
  paper claim that the groups differ, in either direction; None for a question the paper does
  not answer (the verdict is then the sign found: ``positive`` / ``negative``).
- ``check``: a claim with a rule (a location, a shape, an identity): ``holds`` is the rule's
  outcome on ``measured``, the verdict ``reproduced`` or ``not reproduced``.

The per-notebook functions (:func:`toy_ddpm`, :func:`vae_digits`, ...) take the notebook's own
tables and return its findings; they are plain functions so that a test can feed them a
deliberately broken input (psi shuffled across rows) and see the verdict fail.
"""
from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pandas as pd
import scipy.stats

__all__ = ["MARGIN", "check", "collect", "corruptions", "direction", "findings_table", "generated_digits", "join_identity",
           "memorization", "paired", "reward_guidance", "rise_then_drop", "spearman", "toy_ddpm", "trajectories",
           "vae_digits", "welch", "write", "write_findings"]

MARGIN = 3.0
FILE = "verdicts.json"


# --------------------------------------------------------------------------------------------
# the two kinds
# --------------------------------------------------------------------------------------------

def _sign(x: float) -> int:
    return 0 if math.isnan(x) else int(x > 0) - int(x < 0)


def direction(paper: str, statistic: str, measured: float, z: float, paper_sign: int | None, *,
              margin: float = MARGIN, **detail) -> dict:
    """A ``direction`` finding (module doc): the sign of ``z`` counts when ``|z| >= margin``."""
    measured, z = float(measured), float(z)
    found = _sign(z) if abs(z) >= margin else 0
    if paper_sign is None:
        verdict = {1: "positive", -1: "negative", 0: "unresolved"}[found]
        holds = None
    elif paper_sign == 0:
        verdict = "reproduced" if found else "unresolved"
        holds = bool(found)
    else:
        verdict = "reproduced" if found == paper_sign else ("opposite" if found == -paper_sign else "unresolved")
        holds = verdict == "reproduced"
    return {"kind": "direction", "paper": paper, "statistic": statistic, "measured": measured, "z": z,
            "paper_sign": paper_sign, "margin": margin, "sign": found, "verdict": verdict, "holds": holds, **_plain(detail)}


def check(paper: str, statistic: str, measured, holds: bool, rule: str, **detail) -> dict:
    """A ``check`` finding (module doc)."""
    return {"kind": "check", "paper": paper, "statistic": statistic, "measured": _plain(measured), "rule": rule,
            "holds": bool(holds), "verdict": "reproduced" if holds else "not reproduced", **_plain(detail)}


def _plain(x):
    """JSON-safe: numpy scalars and arrays to Python, NaN/inf kept as floats (json writes them)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x)
    return x


# --------------------------------------------------------------------------------------------
# statistics with their spread
# --------------------------------------------------------------------------------------------

def welch(a, b) -> dict:
    """mean(a) - mean(b), its standard error sqrt(var_a / n_a + var_b / n_b) and Welch's t (NaNs dropped)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch needs at least 2 finite values per group, got {len(a)} and {len(b)}")
    diff = float(a.mean() - b.mean())
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return {"effect": diff, "se": se, "z": diff / se if se > 0 else _inf(diff), "n_a": len(a), "n_b": len(b),
            "mean_a": float(a.mean()), "mean_b": float(b.mean())}


def paired(diff) -> dict:
    """The mean of paired differences, its standard error and the paired t (NaNs dropped)."""
    d = np.asarray(diff, np.float64)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        raise ValueError(f"paired needs at least 2 finite differences, got {len(d)}")
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    m = float(d.mean())
    return {"effect": m, "se": se, "z": m / se if se > 0 else _inf(m), "n": len(d), "frac_positive": float((d > 0).mean())}


def spearman(x, y) -> dict:
    """Spearman's rho and its Fisher z, atanh(rho) * sqrt((n - 3) / 1.06) (Fieller, Hartley and
    Pearson's variance for a rank correlation), over the rows where both are finite."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 4:
        raise ValueError(f"spearman needs at least 4 finite pairs, got {n}")
    if np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:   # a constant column: no correlation to speak of
        rho = 0.0
    else:
        rho = float(scipy.stats.spearmanr(x[ok], y[ok]).statistic)
    z = math.atanh(min(max(rho, -0.999999), 0.999999)) * math.sqrt((n - 3) / 1.06)
    return {"effect": rho, "z": z, "n": n}


def _inf(x: float) -> float:
    return math.copysign(math.inf, x) if x != 0 else 0.0


def _dir(paper, statistic, stat: dict, paper_sign, **detail) -> dict:
    extra = {k: v for k, v in stat.items() if k not in ("effect", "z")}
    return direction(paper, statistic, stat["effect"], stat["z"], paper_sign, **extra, **detail)


def rise_then_drop(values, ci95, combine: str = "sum") -> dict:
    """Does a curve over ordered sets rise to an interior peak and drop after it, each change
    larger than the two sets' 95 % half-widths (``ci95``: per set; NaN sets are skipped) combined:
    ``sum`` (the two intervals do not overlap; notebook 03's rule) or ``hypot`` (the difference's
    own 95 % half-width, sqrt(c1^2 + c2^2); notebook 02's)? Returns the values, the peak's
    position, the rise and drop with their combined half-widths, and ``holds``."""
    if combine not in ("sum", "hypot"):
        raise ValueError(f"combine must be 'sum' or 'hypot', got {combine!r}")
    both = (lambda a, b: a + b) if combine == "sum" else math.hypot
    v = pd.Series(np.asarray(values, np.float64))
    c = pd.Series(np.asarray(ci95, np.float64))
    keep = v.notna()
    v, c = v[keep].reset_index(drop=True), c[keep].reset_index(drop=True)
    if len(v) < 3:
        return {"values": v.tolist(), "scored_sets": int(len(v)), "holds": False, "why": "fewer than 3 scored sets"}
    peak = int(v.idxmax())
    rise, rise_ci = float(v[peak] - v[0]), float(both(c[peak], c[0]))
    drop, drop_ci = float(v[peak] - v.iloc[-1]), float(both(c[peak], c.iloc[-1]))
    holds = 0 < peak < len(v) - 1 and rise > rise_ci and drop > drop_ci
    return {"values": v.tolist(), "scored_sets": int(len(v)), "peak": peak, "rise": rise, "rise_ci95": rise_ci,
            "drop": drop, "drop_ci95": drop_ci, "combine": combine, "holds": bool(holds)}


# --------------------------------------------------------------------------------------------
# the notebooks' findings
# --------------------------------------------------------------------------------------------

def toy_ddpm(df: pd.DataFrame, t_ref: int, T: int, offset_col: str = "offset") -> dict:
    """01: ``df`` holds the grid at every timestep (timestep, on_manifold, local_scaling,
    local_rank, local_complexity, and ``offset`` from the nearest mode, 0 = mode, 1 = anti-mode,
    NaN off the circle of modes). Gaps on - off the manifold at ``t_ref`` (the timestep nearest
    0.17 T), the timestep of the most negative psi gap, psi at anti-modes vs modes and the psi-nu
    rank correlation at ``t_ref``."""
    at = df[df.timestep == t_ref]
    on, off = at[at.on_manifold], at[~at.on_manifold]
    out = {}
    for col, name, sign, claim in (("local_scaling", "psi", -1, "psi lower on the data manifold (gap E_M - E_notM < 0)"),
                                   ("local_rank", "nu", -1, "nu lower on the data manifold (gap < 0)"),
                                   ("local_complexity", "delta", 1, "delta higher on the data manifold (gap > 0)")):
        out[f"{name}_gap_on_manifold"] = _dir(f"{claim}, largest near t = 0.17 T (Sec 3.1, Fig 3)",
                                              f"mean on - off the manifold at t = {t_ref} ({t_ref / T:.2f} T), Welch",
                                              welch(on[col], off[col]), sign, timestep=t_ref)
    gaps = {int(t): float(g.local_scaling[g.on_manifold].mean() - g.local_scaling[~g.on_manifold].mean())
            for t, g in df.groupby("timestep")}
    t_min = min(gaps, key=gaps.get)
    out["psi_gap_most_negative_near_0.17T"] = check(
        "the psi gap is most negative near t = 0.17 T", "t / T of the most negative psi gap", t_min / T,
        abs(t_min / T - 0.17) <= 0.1 and gaps[t_min] < 0, "within 0.1 T of 0.17 T and negative",
        gaps={str(k): v for k, v in gaps.items()})
    ring = at[at[offset_col].notna()]
    out["psi_anti_mode_above_mode"] = _dir(
        "psi is highest at the anti-modes, between the modes (Rebuttal Fig 8)",
        f"mean psi near the anti-modes (offset > 0.75) - near the modes (offset < 0.25) at t = {t_ref}, Welch",
        welch(ring.local_scaling[ring[offset_col] > 0.75], ring.local_scaling[ring[offset_col] < 0.25]), 1, timestep=t_ref)
    out["psi_nu_correlated"] = _dir("psi and nu are highly (positively) correlated",
                                    f"Spearman rho(psi, nu) over the grid at t = {t_ref}, Fisher z",
                                    spearman(at.local_scaling, at.local_rank), 1, timestep=t_ref)
    return out


def vae_digits(real: pd.DataFrame, sets_real: pd.DataFrame, sets_prior: pd.DataFrame) -> dict:
    """02: ``real`` per encoded digit (digit, local_scaling, local_rank, local_complexity, mse);
    ``sets_*``: psi level sets with ``vendi`` and ``vendi_se`` (standard error over the subset draws)."""
    out = {"delta_mse_positive": _dir("higher delta goes with higher reconstruction error (Rebuttal Fig 5)",
                                      "Spearman rho(delta, reconstruction MSE) over the encoded digits, Fisher z",
                                      spearman(real.local_complexity, real.mse), 1)}
    by = real.groupby("digit").local_complexity
    means, sems = by.mean(), by.sem()
    others = means.drop(1)
    nxt = others.idxmin()
    diff = float(means[1] - others[nxt])
    se = float(math.hypot(sems[1], sems[nxt]))
    out["delta_lowest_for_1"] = direction("delta is lowest for the digit 1 (Rebuttal Fig 6)",
                                          "mean delta of the 1s - the lowest mean delta among the other digits",
                                          diff, diff / se if se > 0 else _inf(diff), -1, lowest_other=int(nxt),
                                          lowest_digit=int(means.idxmin()), se=se)
    kw = scipy.stats.kruskal(*[g.local_rank.to_numpy() for _, g in real.groupby("digit")])
    out["nu_flat_across_digits"] = check("nu shows no pattern across digits (Rebuttal Fig 6)",
                                         "Kruskal-Wallis p of nu across the 10 digits", float(kw.pvalue), kw.pvalue >= 0.01,
                                         "p >= 0.01 (no detectable difference)",
                                         class_mean_range=float(real.groupby("digit").local_rank.mean().agg(np.ptp)))
    for name, sets in (("encoded", sets_real), ("prior", sets_prior)):
        r = rise_then_drop(sets.vendi, 1.96 * sets.vendi_se, combine="hypot")
        out[f"vendi_rise_then_drop_{name}"] = check(
            "Vendi per psi level set rises, then drops at the top sets (Rebuttal Fig 9)",
            f"Vendi per psi level set ({name}); the CI is over subset draws of the same samples",
            r["values"], r["holds"], "interior peak, rise and drop beyond 1.96 x their standard errors",
            **{k: v for k, v in r.items() if k not in ("values", "holds")})
    return out


def generated_digits(frames: dict, tables: dict) -> dict:
    """03: per model, ``frames[name]`` (local_scaling, confidence per sample) and ``tables[name]``
    (psi level sets with ``vendi`` and ``vendi_ci95`` over subset draws)."""
    out = {}
    for name, tab in tables.items():
        r = rise_then_drop(tab.vendi, tab.vendi_ci95, combine="sum")
        out[f"{name}_vendi_rise_then_drop"] = check(
            "Vendi per psi level set rises, then drops at the top sets (DiT-XL / SD figure)",
            f"{name}: Vendi per psi level set; the CI is over subset draws of the same samples",
            r["values"], r["holds"], "interior peak, rise and drop beyond the two 95 % half-widths",
            **{k: v for k, v in r.items() if k not in ("values", "holds")})
        df = frames[name]
        out[f"{name}_confidence_falls_with_psi"] = _dir(
            "high psi goes with lower fidelity (the beta-VAE's top level set)",
            f"{name}: Spearman rho(psi, classifier confidence), Fisher z", spearman(df.local_scaling, df.confidence), -1)
    return out


def trajectories(seps: dict, where: dict) -> dict:
    """04: ``seps[name]``: a :func:`geomjobs.analysis.trajectories.separation` table (high vs low
    final quality, per step); ``where[name]``: its :func:`first_separation`. No paper claim: the
    verdict is the sign found at the generated sample (the last step)."""
    out = {}
    for name, s in seps.items():
        last = s.sort_values("step").iloc[-1]
        se = (last.mean_a - last.mean_b) / last.t if last.t else math.nan
        out[f"{name}_high_minus_low_at_end"] = direction(
            "(no paper claim) where do the descriptors separate good from poor final samples?",
            f"mean {name} of the top - bottom quartile of final confidence at the generated sample, Welch",
            last.mean_a - last.mean_b, last.t, None, se=se, separated_from_step=where[name]["from"],
            first_separated_step=where[name]["first"])
    return out


def memorization(tables: dict) -> dict:
    """05: ``tables[where]`` per descriptor name: a frame with ``group`` (memorized / novel) and
    the descriptor columns. The paper's claim is a difference (Welch p), not its sign."""
    paper = {"psi": "p < 1e-6", "nu": "p < 1e-6", "delta": "p = 0.0004"}
    col = {"psi": "local_scaling", "nu": "local_rank", "delta": "local_complexity"}
    out = {}
    for where, frame in tables.items():
        for name in ("psi", "nu", "delta"):
            m = frame.group == "memorized"
            out[f"{name}_memorized_vs_novel_{where}"] = _dir(
                f"memorized and novel samples differ in {name} at the last denoising step (Fig 8, SD: {paper[name]})",
                f"mean {name} memorized - novel ({where}), Welch", welch(frame[col[name]][m], frame[col[name]][~m]), 0)
    return out


def corruptions(df: pd.DataFrame) -> dict:
    """06: ``df`` with kind (clean / blur / noise), severity, digit and local_scaling. Per
    corruption, psi at the strongest severity minus psi of the same digit clean (paired t)."""
    clean = df[df.kind == "clean"].set_index("digit").local_scaling
    out = {}
    for kind, sign, claim in (("blur", -1, "blur lowers psi (Fig 6)"), ("noise", 1, "additive noise raises psi (Fig 6)")):
        sub = df[df.kind == kind]
        top = sub.severity.max()
        at = sub[sub.severity == top].set_index("digit").local_scaling
        d = (at - clean.reindex(at.index)).to_numpy()
        out[f"{kind}_{'lowers' if sign < 0 else 'raises'}_psi"] = _dir(
            claim, f"psi at {kind} {top:g} - psi of the same digit clean, paired t", paired(d), sign,
            severity=float(top), rho_severity=spearman(pd.concat([df[df.kind == "clean"].severity, sub.severity]),
                                                       pd.concat([df[df.kind == "clean"].local_scaling, sub.local_scaling]))["effect"])
    return out


def reward_guidance(base: pd.DataFrame, best: pd.DataFrame, per_sample: dict) -> dict:
    """07: ``base`` / ``best``: per baseline level set, the baseline's and the psi-maximising
    scale's psi_mean, psi_ci95, vendi, quality; ``per_sample[scale]``: (sample_id, local_scaling)
    of each dataset (0 = the baseline; pairs share the seed's noise)."""
    both = base.merge(best, left_index=True, right_index=True, how="inner", suffixes=("", "_best"))
    both = both.dropna(subset=["psi_mean", "psi_mean_best"])
    up = both.psi_mean_best - both.psi_mean
    n = len(both)
    out = {}
    b0 = per_sample[0.0].set_index("sample_id").local_scaling
    top = max(per_sample)
    g = per_sample[top].set_index("sample_id").local_scaling
    out["psi_up_at_largest_scale"] = _dir("reward guidance raises psi (Sec 5, Rebuttal Fig 1)",
                                          f"psi at scale {top:g} - psi of the same seed's baseline sample, paired t",
                                          paired((g - b0.reindex(g.index)).to_numpy()), 1, scale=float(top))
    sig = up > np.hypot(both.psi_ci95.fillna(np.inf), both.psi_ci95_best.fillna(np.inf))
    out["psi_up_in_most_bins"] = check("psi up in most baseline level sets at the psi-maximising scale",
                                       "level sets with higher mean psi at the best scale", int((up > 0).sum()),
                                       (up > 0).sum() > n / 2, "more than half of the level sets with samples",
                                       bins=n, beyond_both_ci95=int(sig.sum()))
    half = n // 2
    out["psi_gain_larger_at_low_psi"] = check("the psi gain is larger in the low-psi level sets",
                                              "mean gain, lower half of the bins - upper half",
                                              float(up.iloc[:half].mean() - up.iloc[half:].mean()) if n >= 2 else math.nan,
                                              n >= 2 and up.iloc[:half].mean() > up.iloc[half:].mean(), "> 0")
    for col, claim in (("vendi", "diversity (Vendi)"), ("quality", "quality (classifier confidence)")):
        k = int((both[f"{col}_best"] > both[col]).sum())
        out[f"{col}_up_in_most_bins"] = check(f"{claim} up in most level sets", f"level sets with higher {col} at the best scale",
                                              k, k > n / 2, "more than half of the level sets with samples", bins=n)
    return out


def join_identity(max_off_integer: float, mean_rank: float, bound: float = 1e-3) -> dict:
    """08: psi_B - psi_A = rank x log 2 on every joined pair (B's last layer is A's doubled)."""
    return {"join_pairs_the_right_rows": check(
        "(no paper claim) the join by sample_id pairs the right rows",
        "max over pairs of |(psi_B - psi_A) / log 2 - nearest integer|", float(max_off_integer),
        float(max_off_integer) < bound, f"< {bound:g} (a wrong pairing gives about 0.5)", mean_rank=float(mean_rank))}


# --------------------------------------------------------------------------------------------
# files and the table
# --------------------------------------------------------------------------------------------

def write(out_dir: str, notebook: str, findings: dict, *, full: bool, size: dict) -> str:
    """Write ``<out_dir>/verdicts.json``: {"notebook", "full", "size", "findings"}; returns the path."""
    path = os.path.join(str(out_dir), FILE)
    doc = {"notebook": notebook, "full": bool(full), "size": _plain(size), "findings": _plain(findings)}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=True)
        f.write("\n")
    return path


def collect(root: str) -> dict:
    """{notebook: its verdicts.json document} for every ``<root>/*/verdicts.json``."""
    docs = {}
    for path in sorted(glob.glob(os.path.join(str(root), "*", FILE))):
        with open(path) as f:
            doc = json.load(f)
        docs[doc.get("notebook") or os.path.basename(os.path.dirname(path))] = doc
    return docs


def _num(x) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "nan" if math.isnan(x) else (f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}")
    if isinstance(x, list):
        return "[" + ", ".join(_num(v) for v in x) + "]"
    return str(x)


def _size(doc: dict) -> str:
    size = ", ".join(f"{k} {_num(v)}" for k, v in doc.get("size", {}).items())
    return ("full size" if doc.get("full") else "small defaults") + (f" ({size})" if size else "")


def findings_table(docs: dict) -> str:
    """The markdown table of every finding in ``docs`` (from :func:`collect`), one row each."""
    lines = ["| notebook | finding | paper | measured | verdict |", "|---|---|---|---|---|"]
    for nb, doc in docs.items():
        for key, f in doc["findings"].items():
            if f["kind"] == "direction":
                measured = f"{f['statistic']}: {_num(f['measured'])} (z = {f['z']:+.1f})"
            else:
                measured = f"{f['statistic']}: {_num(f['measured'])} (rule: {f['rule']})"
            cells = [f"`{nb}`", key, f["paper"], measured, f"**{f['verdict']}**"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_findings(root: str, path: str, command: str = "make notebooks") -> str:
    """Write the findings table of ``<root>/*/verdicts.json`` to ``path`` (markdown, with a
    header naming the command and each notebook's size); returns the text."""
    docs = collect(root)
    sizes = sorted({"full size" if d.get("full") else "the small defaults" for d in docs.values()})
    text = (f"<!-- generated by `{command}` (geomjobs.analysis.findings.write_findings) from {root}/*/verdicts.json; "
            f"do not edit by hand -->\n"
            f"# What the notebooks find\n\n"
            f"Measured at {' and '.join(sizes) or 'no size'} ({len(docs)} notebooks); `make notebooks` regenerates this "
            f"file at full size. A `direction` finding is a signed statistic in units of its standard error (z); its sign "
            f"counts when |z| >= {MARGIN:g} (about 0.1-0.2 % of runs with no true effect get past that in a given "
            f"direction): **reproduced** is the paper's sign, **opposite** the other, **unresolved** neither; **positive** / "
            f"**negative** where the paper makes no claim. A `check` is a rule (stated in the row) that holds "
            f"(**reproduced**) or not. Vendi CIs are over subset draws of the same samples, not over fresh samples.\n\n"
            + "".join(f"- `{nb}`: {_size(doc)}\n" for nb, doc in docs.items()) + "\n" + findings_table(docs))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text
