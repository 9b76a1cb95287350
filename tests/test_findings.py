"""geomjobs.analysis.findings: the statistics against scipy, the verdict rules, each notebook's
verdict function on a small synthetic input where the answer is known and on the same input with
the relation broken (psi or the labels shuffled: the verdict must fall back to unresolved / not
reproduced), and the findings table written from verdicts.json files."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from geomjobs.analysis import findings

MARGIN = findings.MARGIN


# --------------------------------------------------------------------------------------------
# statistics and rules
# --------------------------------------------------------------------------------------------

def test_statistics_match_scipy(rng):
    a, b = rng.normal(0.3, 1.0, 40), rng.normal(0.0, 2.0, 55)
    w = findings.welch(a, b)
    assert w["z"] == pytest.approx(scipy.stats.ttest_ind(a, b, equal_var=False).statistic, rel=1e-12)
    assert w["effect"] == pytest.approx(a.mean() - b.mean(), rel=1e-12) and w["effect"] / w["se"] == pytest.approx(w["z"])
    d = rng.normal(0.2, 1.0, 30)
    p = findings.paired(d)
    assert p["z"] == pytest.approx(scipy.stats.ttest_1samp(d, 0.0).statistic, rel=1e-12)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    s = findings.spearman(x, y)
    rho = scipy.stats.spearmanr(x, y).statistic
    assert s["effect"] == pytest.approx(rho, rel=1e-12)
    assert s["z"] == pytest.approx(math.atanh(rho) * math.sqrt(47 / 1.06), rel=1e-12)
    # NaNs are dropped, a constant column has rho 0
    assert findings.welch(np.r_[a, np.nan], b)["n_a"] == 40
    assert findings.spearman(x, np.ones(50))["z"] == 0.0


@pytest.mark.parametrize("z,paper_sign,verdict,sign", [
    (3.5, 1, "reproduced", 1), (-3.5, 1, "opposite", -1), (2.9, 1, "unresolved", 0), (-2.9, -1, "unresolved", 0),
    (-3.0, -1, "reproduced", -1), (-4.0, 0, "reproduced", -1), (1.0, 0, "unresolved", 0),
    (5.0, None, "positive", 1), (-5.0, None, "negative", -1), (0.5, None, "unresolved", 0), (math.nan, 1, "unresolved", 0)])
def test_direction_counts_a_sign_only_beyond_the_margin(z, paper_sign, verdict, sign):
    f = findings.direction("claim", "stat", 1.0, z, paper_sign)
    assert f["verdict"] == verdict and f["sign"] == sign and f["margin"] == MARGIN
    assert f["holds"] == (None if paper_sign is None else verdict == "reproduced")


def test_rise_then_drop():
    ci = [0.1] * 5
    assert findings.rise_then_drop([1.0, 2.0, 3.0, 2.0, 1.5], ci)["holds"]
    assert not findings.rise_then_drop([1.0, 2.0, 3.0, 3.5, 4.0], ci)["holds"]          # no drop: peak at the end
    assert not findings.rise_then_drop([1.0, 2.0, 3.0, 2.9, 2.9], ci)["holds"]          # drop within the CIs
    r = findings.rise_then_drop([np.nan, 1.0, 3.0, np.nan, 2.0], [np.nan, 0.1, 0.1, np.nan, 0.1])
    assert r["holds"] and r["values"] == [1.0, 3.0, 2.0] and r["peak"] == 1
    assert not findings.rise_then_drop([1.0, 2.0], [0.1, 0.1])["holds"]
    # two overlapping intervals whose difference is still beyond its own half-width
    assert not findings.rise_then_drop([1.0, 1.3, 1.0], [0.2] * 3)["holds"]
    assert findings.rise_then_drop([1.0, 1.3, 1.0], [0.2] * 3, combine="hypot")["holds"]       # 0.3 > 0.28


# --------------------------------------------------------------------------------------------
# the notebooks' verdict functions: a known answer, then the relation broken
# --------------------------------------------------------------------------------------------

def directions(f: dict) -> dict:
    return {k: v["sign"] for k, v in f.items() if v["kind"] == "direction"}


def test_toy_ddpm_verdicts_and_shuffled_psi(rng):
    """A grid at two timesteps where psi is 1 lower on the manifold and at the modes, nu tracks
    psi and delta is higher on the manifold: every paper direction is reproduced, the most
    negative psi gap is at t = 17; with psi shuffled across the rows the psi findings are
    unresolved."""
    n = 2000
    frames = []
    for t, shift in ((17, 1.0), (70, 0.3)):
        on = rng.random(n) < 0.2
        offset = np.where(rng.random(n) < 0.3, rng.random(n), np.nan)
        psi = rng.normal(0, 0.5, n) - shift * on + np.nan_to_num(offset, nan=0.5)
        frames.append(pd.DataFrame({"timestep": t, "on_manifold": on, "offset": offset, "local_scaling": psi,
                                    "local_rank": psi + rng.normal(0, 0.2, n),
                                    "local_complexity": 10 + 2.0 * on + rng.normal(0, 1, n)}))
    df = pd.concat(frames, ignore_index=True)
    f = findings.toy_ddpm(df, 17, 100)
    assert directions(f) == {"psi_gap_on_manifold": -1, "nu_gap_on_manifold": -1, "delta_gap_on_manifold": 1,
                             "psi_anti_mode_above_mode": 1, "psi_nu_correlated": 1}
    assert all(v["verdict"] == "reproduced" for v in f.values()), {k: v["verdict"] for k, v in f.items()}
    assert f["psi_gap_most_negative_near_0.17T"]["measured"] == 0.17
    broken = df.assign(local_scaling=rng.permutation(df.local_scaling.to_numpy()))
    g = findings.toy_ddpm(broken, 17, 100)
    for key in ("psi_gap_on_manifold", "psi_anti_mode_above_mode", "psi_nu_correlated"):
        assert g[key]["verdict"] == "unresolved", (key, g[key]["z"])


def test_memorization_and_corruption_verdicts_and_broken_inputs(rng):
    n = 300
    mem = rng.random(n) < 0.25
    frame = pd.DataFrame({"group": np.where(mem, "memorized", "novel"), "local_scaling": rng.normal(0, 1, n) - 2.0 * mem,
                          "local_rank": rng.normal(0, 1, n), "local_complexity": rng.normal(0, 1, n) + 1.0 * mem})
    f = findings.memorization({"denoiser": frame})
    assert directions(f) == {"psi_memorized_vs_novel_denoiser": -1, "nu_memorized_vs_novel_denoiser": 0,
                             "delta_memorized_vs_novel_denoiser": 1}
    assert f["psi_memorized_vs_novel_denoiser"]["verdict"] == "reproduced"        # the paper's claim: they differ
    g = findings.memorization({"denoiser": frame.assign(group=rng.permutation(frame.group.to_numpy()))})
    assert set(directions(g).values()) == {0}

    digits = np.arange(100)
    clean = rng.normal(-3.8, 1.0, 100)
    rows = [pd.DataFrame({"kind": "clean", "severity": 0.0, "digit": digits, "local_scaling": clean})]
    for s in (1.0, 2.0):
        rows.append(pd.DataFrame({"kind": "blur", "severity": s, "digit": digits, "local_scaling": clean - s + rng.normal(0, 0.3, 100)}))
        rows.append(pd.DataFrame({"kind": "noise", "severity": s / 4, "digit": digits,
                                  "local_scaling": clean + s + rng.normal(0, 0.3, 100)}))
    df = pd.concat(rows, ignore_index=True)
    c = findings.corruptions(df)
    assert {k: v["verdict"] for k, v in c.items()} == {"blur_lowers_psi": "reproduced", "noise_raises_psi": "reproduced"}
    assert c["blur_lowers_psi"]["severity"] == 2.0 and c["noise_raises_psi"]["frac_positive"] == 1.0
    flipped = findings.corruptions(df.assign(kind=df.kind.replace({"blur": "noise", "noise": "blur"})))
    assert {k: v["verdict"] for k, v in flipped.items()} == {"blur_lowers_psi": "opposite", "noise_raises_psi": "opposite"}


def test_reward_guidance_verdicts():
    ids = np.arange(200)
    base_psi = np.linspace(-6, 0, 200)
    per = {0.0: pd.DataFrame({"sample_id": ids, "local_scaling": base_psi}),
           1.0: pd.DataFrame({"sample_id": ids, "local_scaling": base_psi + 1.0 + 0.1 * np.sin(ids)})}
    lv = pd.DataFrame({"psi_mean": np.linspace(-6, 0, 4), "psi_ci95": 0.2, "vendi": [2.0, 3.0, 3.0, 2.0], "quality": 0.9},
                      index=pd.Index(range(4), name="level_set"))
    best = lv.assign(psi_mean=lv.psi_mean + [3.0, 2.0, 1.0, 0.5], vendi=[1.0, 1.0, 4.0, 1.0], quality=0.95)
    f = findings.reward_guidance(lv, best, per)
    assert f["psi_up_at_largest_scale"]["verdict"] == "reproduced" and f["psi_up_at_largest_scale"]["scale"] == 1.0
    assert f["psi_up_in_most_bins"]["measured"] == 4 and f["psi_up_in_most_bins"]["beyond_both_ci95"] == 4
    assert f["psi_gain_larger_at_low_psi"]["holds"] and f["psi_gain_larger_at_low_psi"]["measured"] == pytest.approx(1.75)
    assert not f["vendi_up_in_most_bins"]["holds"] and f["quality_up_in_most_bins"]["holds"]
    # the guided samples paired with the wrong baseline samples: no longer a consistent rise
    per[1.0] = per[1.0].assign(sample_id=np.random.default_rng(1).permutation(ids), local_scaling=base_psi)
    assert findings.reward_guidance(lv, best, per)["psi_up_at_largest_scale"]["verdict"] == "unresolved"


def test_join_identity_holds_for_the_right_pairs_only(rng):
    """psi of A and of B = 2 A (a k-dim Jacobian): psi_B - psi_A = k log 2 on the right pairs;
    joined on shuffled ids the gap is off an integer by up to 0.5."""
    jac = rng.normal(size=(500, 8, 4))
    psi_a = np.linalg.slogdet(np.einsum("nij,nik->njk", jac, jac))[1] / 2
    psi_b = psi_a + 4 * np.log(2)

    def join(b):
        gap = (b - psi_a) / np.log(2)
        return float(np.abs(gap - np.round(gap)).max()), float(gap.mean())

    assert findings.join_identity(*join(psi_b))["join_pairs_the_right_rows"]["holds"]
    wrong = findings.join_identity(*join(rng.permutation(psi_b)))["join_pairs_the_right_rows"]
    assert not wrong["holds"] and wrong["measured"] > 0.4 and wrong["verdict"] == "not reproduced"


# --------------------------------------------------------------------------------------------
# files and the table
# --------------------------------------------------------------------------------------------

def test_verdicts_json_round_trip_and_the_findings_table(tmp_path):
    f = {"noise_raises_psi": findings.direction("additive noise raises psi", "paired t", np.float64(1.3), 11.3, 1,
                                                se=np.float32(0.11), n=np.int64(200)),
         **findings.join_identity(np.float32(2e-7), 4.0)}
    (tmp_path / "06_corruptions").mkdir()
    findings.write(tmp_path / "06_corruptions", "06_corruptions", f, full=False, size={"n_images": np.int64(3)})
    doc = json.loads((tmp_path / "06_corruptions" / "verdicts.json").read_text())
    assert doc["size"] == {"n_images": 3} and doc["findings"]["noise_raises_psi"]["verdict"] == "reproduced"
    assert findings.collect(tmp_path) == {"06_corruptions": doc}
    text = findings.write_findings(str(tmp_path), str(tmp_path / "docs" / "findings.md"))
    assert (tmp_path / "docs" / "findings.md").read_text() == text
    assert "Measured at the small defaults (1 notebooks)" in text
    rows = [r for r in text.splitlines() if r.startswith("| `06_corruptions`")]
    assert "- `06_corruptions`: small defaults (n_images 3)" in text
    assert len(rows) == 2 and all(r.count(" | ") == 4 for r in rows)          # the `|` in a statistic is escaped
    assert "| noise_raises_psi |" in rows[0] and rows[0].endswith("| **reproduced** |")
    assert "\\|(psi_B - psi_A)" in rows[1]
