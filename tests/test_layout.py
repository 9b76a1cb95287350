"""The mathematics imports without the distributed and storage layers (README: Layout)."""
import subprocess
import sys


def test_geometry_imports_without_ray_or_pyarrow():
    code = ("import sys, geomjobs.geometry, geomjobs.geometry.complexity, geomjobs.geometry.estimators; "
            "bad = [m for m in ('ray', 'pyarrow', 'pandas', 'gcsfs') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
