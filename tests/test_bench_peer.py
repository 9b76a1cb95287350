"""benchmarks/bench_peer.py (`make bench-peer`) without torch: the nominal peak from CPU flags and
clock, the psi check and its tolerance, the section writer, and a --smoke run end to end with
tests/peer_numpy.py standing in for the torch worker (same pipe protocol; the MLP's Jacobian
in closed form in NumPy), so geomjobs' psi is checked against an independent reference in
float32 and float64. A check of the harness, not a timing: no speed is compared."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import bench_peer  # noqa: E402

ZEN4 = "processor\t: 0\ncpu MHz\t\t: 2596.130\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 avx512vl\n"


def test_nominal_peak_is_cores_clock_lanes_and_fma():
    p = bench_peer.cpu_peak(cpuinfo=ZEN4, lscpu="", cores=2)
    assert p["f32"] == pytest.approx(2 * 2596.130e6 * 16 * 2)          # 166 GFLOP/s
    assert p["bf16"] == pytest.approx(2 * p["f32"]) and p["bf16_flags"] == ["avx512_bf16"]
    assert "/proc/cpuinfo cpu MHz" in p["text"] and "166 GFLOP/s fp32" in p["text"]
    # lscpu's max clock wins over cpuinfo's; two FMA units double it
    p = bench_peer.cpu_peak(fma_units=2, cpuinfo=ZEN4, lscpu="CPU max MHz:  3700.0000\n", cores=4)
    assert p["f32"] == pytest.approx(4 * 3700e6 * 16 * 2 * 2) and "lscpu CPU max MHz" in p["text"]
    # AVX2 without avx512: 8 lanes, no bf16 peak
    avx2 = ZEN4.replace(" avx512f avx512_bf16 avx512vl", "")
    p = bench_peer.cpu_peak(cpuinfo=avx2, lscpu="", cores=2)
    assert p["f32"] == pytest.approx(2 * 2596.130e6 * 8 * 2) and p["bf16"] is None
    # no clock anywhere: no peak (the section prints n/a), not a zero
    assert bench_peer.cpu_peak(cpuinfo="flags : avx2 fma\n", lscpu="", cores=2)["f32"] is None


def _result(psi_t, psi_g, psi64_t, psi64_g, name="mlp", k=120, d=64):
    return {"name": name, "k": k, "d": d,
            "psi32": {"geomjobs": np.asarray(psi_g), "geomjobs_vjp": np.asarray(psi_g), "torch": np.asarray(psi_t)},
            "psi64": {"geomjobs": np.asarray(psi64_g), "torch": np.asarray(psi64_t)}}


def test_psi_check_holds_within_the_tolerance_and_fails_beyond_it():
    tol32, tol64 = bench_peer.psi_tolerance({"k": 120, "d": 64})
    assert (tol32, tol64) == pytest.approx((64 * bench_peer.TOL32, 64 * bench_peer.TOL64))
    psi = np.array([1.0, -2.0, 30.0])
    assert bench_peer.check(_result(psi, psi + 0.5 * tol32, psi, psi + 0.5 * tol64)) == []
    bad = bench_peer.check(_result(psi, psi + 2 * tol32, psi, psi))
    assert len(bad) == 2 and all("float32" in m for m in bad)      # the chosen side and the vjp side
    bad = bench_peer.check(_result(psi, psi, psi, psi + 2 * tol64))
    assert len(bad) == 1 and "float64" in bad[0]
    # a float32-only model is held to the float32 tolerance in its float64 run
    assert bench_peer.check(_result(psi, psi, psi, psi + 2 * tol64, name="dit-digits")) == []
    assert bench_peer.check(_result(psi, psi, psi, psi + np.nan)) != []  # NaN never passes


def test_write_section_replaces_its_own_section_only(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\n## A\n\nold a\n\n## " + bench_peer.TITLE + "\n\nold peer\n\n## C\n\nc text\n")
    bench_peer.write_section(str(md), "new peer")
    text = md.read_text()
    assert "old peer" not in text and "new peer" in text and "old a" in text and "c text" in text
    assert text.index("## A") < text.index("new peer") < text.index("## C")
    bench_peer.write_section(str(tmp_path / "new.md"), "first")
    assert "## " + bench_peer.TITLE + "\n\nfirst" in (tmp_path / "new.md").read_text()


def test_smoke_run_end_to_end_against_a_numpy_reference(tmp_path):
    out, raw = tmp_path / "B.md", tmp_path / "peer.json"
    rc = bench_peer.main(["--smoke", "--peer-python", sys.executable, "--peer-worker", str(HERE / "peer_numpy.py"),
                          "--out", str(out), "--json", str(raw)])
    assert rc == 0
    text = out.read_text()
    assert bench_peer.TITLE in text and "execution.dtype: bfloat16" in text and "MISMATCH" not in text
    (res,) = json.loads(raw.read_text())
    assert (res["d"], res["n"], res["k"], res["batch"]) == (64, 3072, 120, 16)
    # geomjobs' float64 psi against the closed-form Jacobian's: the same function and estimator
    g64, ref64 = np.asarray(res["psi64"]["geomjobs"]), np.asarray(res["psi64"]["torch"])
    assert np.all(np.isfinite(ref64)) and np.max(np.abs(g64 - ref64)) < 1e-9
    g32 = np.asarray(res["psi32"]["geomjobs"])
    assert np.max(np.abs(g32 - ref64)) <= bench_peer.psi_tolerance(res)[0]
    # FLOP per sample by XLA's count, per sample (not per batch, 16x more): above the VJP work that
    # cannot be shared across the batch (k rows through the 256-256 and 256-64 layers), below k
    # full VJPs and a forward pass per sample with nothing shared (a dense layer's VJP to its
    # input costs what its forward does); XLA counts the SVD's loop body once, a small term
    layers = [(64, 256), (256, 256), (256, 3072)]
    fwd = sum(2 * a * b for a, b in layers)
    assert 120 * 2 * (256 * 256 + 256 * 64) < res["flops"]["chosen"] < 121 * fwd
    # the error table compares two different runs: bf16 rounding shows (a float32 job twice gives 0);
    # its accuracy bound is tests/test_bf16_rows.py's
    e = res["bf16"]["errors"]
    assert e["count"] == 32 and 0 < e["median_rel"] <= e["max_rel"] and -1 <= e["spearman"] <= 1
