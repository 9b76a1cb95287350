"""The package's floors (README: Layout): nothing imports from a floor above its own.

Every ``import`` / ``from ... import`` of a geomjobs module is read with ``ast`` wherever it is in
a module (module level, inside functions, methods and classes); only an ``if TYPE_CHECKING:``
block is exempt (it never runs). ``from geomjobs import x`` names the package ``x`` where
``geomjobs/x`` is one, else the face (``geomjobs/__init__.py``: ``run_job``, ``open_dataset``).
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "geomjobs"

# ground up; a package may import its own floor and the floors below it, never one above
FLOORS = (
    # 1: no geomjobs dependencies beyond this floor. schemas: the JSON files spec and records read
    # (data, no code); records: the record schema's Arrow form, which sink writes
    ("errors", "diffusion", "metrics", "records", "schemas", "sink", "spec", "_version", "_xla"),
    ("geometry",),                              # 2: the mathematics
    ("generators",),                            # 3: models G and their denoisers
    # 4: samplers, reward guidance and the reward network; zoo: the shipped weights, the digits
    # data that latents read, and the scripts that train zoo generators and check them by sampling
    ("sampling", "zoo"),
    ("latents",),                               # 5: latent sources (images, generated, ...)
    ("descriptors",),                           # 6: the descriptor registry (may not exist yet)
    ("runner",),                                # 7: plans, shards, drivers
    ("fisher", "reward", "analysis"),           # 8: applications on top of jobs and datasets
    ("__init__", "cli", "demo", "jobs_api"),    # 9: the face
)
FLOOR = {pkg: i + 1 for i, floor in enumerate(FLOORS) for pkg in floor}
FACE = FLOORS[-1]
# the table: importer package -> the packages it may import
ALLOWED = {pkg: frozenset(p for p, f in FLOOR.items() if f <= FLOOR[pkg]) for pkg in FLOOR}
# known upward imports, each (file, imported package) with its reason; nothing else may be added
EXCEPTIONS: set = set()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Every Import / ImportFrom node outside ``if TYPE_CHECKING:`` bodies, at any depth."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _package_of(dotted: str) -> str | None:
    """The floor unit of a dotted geomjobs module: its first component under geomjobs
    (``geomjobs.sampling.guidance`` -> ``sampling``), ``__init__`` for the face itself, None
    outside geomjobs."""
    parts = dotted.split(".")
    if parts[0] != "geomjobs":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def imported_packages(source: str, module: str, root: Path = ROOT) -> list[tuple[str, int]]:
    """(imported floor unit, line) of every geomjobs import in ``source``, the module
    ``module`` (dotted, e.g. ``geomjobs.latents.generated``; a package's ``__init__`` is its
    package's name with ``.__init__``)."""
    out = []
    here = module.split(".")
    for node in _runtime_imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:      # relative: from the module's package, ``level`` steps up
                base = here[:len(here) - node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "geomjobs":   # from geomjobs import x: a package, else a name of the face
                targets = [f"geomjobs.{a.name}" if (root / a.name).is_dir() or (root / f"{a.name}.py").is_file()
                           else "geomjobs" for a in node.names]
            else:
                targets = [mod]
        out += [(pkg, node.lineno) for pkg in map(_package_of, targets) if pkg is not None]
    return out


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        yield path, ".".join(rel.parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if parts == ["geomjobs", "__init__"] else parts[1]


def imports_by_package() -> dict[str, list[tuple[str, str, int]]]:
    """importer unit -> [(imported unit, file, line)] over the installed package, own unit left out."""
    out: dict[str, list] = {}
    for path, module in _modules():
        unit = _unit(module)
        for pkg, line in imported_packages(path.read_text(), module):
            if pkg != unit:
                out.setdefault(unit, []).append((pkg, str(path.relative_to(ROOT.parent)), line))
    return out


def test_every_package_has_a_floor():
    units = {_unit(m) for _, m in _modules()} | {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert units <= set(FLOOR), f"packages without a floor (add them to FLOORS): {sorted(units - set(FLOOR))}"


@pytest.mark.parametrize("importer", sorted(FLOOR))
def test_nothing_imports_from_a_floor_above_its_own(importer):
    bad = [f"{file}:{line} imports geomjobs.{pkg} (floor {FLOOR.get(pkg, '?')})"
           for pkg, file, line in imports_by_package().get(importer, [])
           if pkg not in ALLOWED[importer] and (file, pkg) not in EXCEPTIONS]
    assert not bad, f"{importer} (floor {FLOOR[importer]}) may import only {sorted(ALLOWED[importer])}:\n" + "\n".join(bad)


def test_runner_and_below_never_import_the_face():
    bad = [(unit, pkg, file, line) for unit, rows in imports_by_package().items() if FLOOR[unit] <= FLOOR["runner"]
           for pkg, file, line in rows if pkg in FACE]
    assert not bad


def test_no_two_packages_import_each_other():
    edges = {(unit, pkg) for unit, rows in imports_by_package().items() for pkg, _, _ in rows}
    assert not {(a, b) for a, b in edges if (b, a) in edges}


def test_the_face_imports_only_the_ground_floor_eagerly():
    """Every ``import geomjobs.x`` runs geomjobs/__init__.py first: at module level it may import
    only floor 1, or importing the mathematics would start the runner."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    eager = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    pkgs = {pkg for n in eager for pkg, _ in imported_packages(ast.unparse(n), "geomjobs.__init__")}
    assert all(FLOOR[p] == 1 for p in pkgs), pkgs


def test_the_scanner_sees_upward_imports_anywhere(tmp_path):
    """The scanner itself: an upward import is found at module level, inside a function and a
    method, relative or absolute, and through ``from geomjobs import``; a TYPE_CHECKING block is
    exempt; the floor check then fails on it."""
    for name in ("runner", "sampling"):
        (tmp_path / name).mkdir()
    (tmp_path / "diffusion.py").write_text("")
    source = (
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "from geomjobs import diffusion\n"                      # line 3: floor 1
        "from geomjobs import run_job, runner\n"                # line 4: the face, and runner
        "if TYPE_CHECKING:\n"
        "    from geomjobs.reward import train\n"               # exempt
        "def f():\n"
        "    import geomjobs.latents.generated\n"               # line 8: function-local
        "class C:\n"
        "    def m(self):\n"
        "        from ..runner import plan\n"                   # line 11: relative, two levels up
        "        from . import guidance\n")                     # line 12: its own package
    got = imported_packages(source, "geomjobs.sampling.samplers", root=tmp_path)
    assert sorted(got) == [("__init__", 4), ("diffusion", 3), ("latents", 8), ("runner", 4), ("runner", 11), ("sampling", 12)]
    upward = {pkg for pkg, _ in got if pkg not in ALLOWED["sampling"]}
    assert upward == {"__init__", "runner", "latents"}


def test_geometry_imports_without_ray_or_pyarrow():
    code = ("import sys, geomjobs.geometry, geomjobs.geometry.complexity, geomjobs.geometry.estimators; "
            "bad = [m for m in ('ray', 'pyarrow', 'pandas', 'gcsfs') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_errors_live_on_the_ground_floor_and_keep_their_old_names():
    from geomjobs import errors, spec
    from geomjobs.runner import ray_connect
    from geomjobs.sink import dataset

    assert spec.SpecError is errors.SpecError
    assert dataset.DatasetError is errors.DatasetError
    assert ray_connect.WorkerPoolError is errors.WorkerPoolError
    assert not [n for n in ast.walk(ast.parse((ROOT / "errors.py").read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))
                and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
