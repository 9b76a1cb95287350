"""The documentation matches the code: every spec key in the job schema, every latent kind and zoo
model is in the job-spec reference; every command-line flag is in docs/cli.md and the reverse;
links between the pages resolve; nothing points outside the repository."""
import argparse
import json
import re
from pathlib import Path

from geomjobs.cli import build_parser
from geomjobs.generators.zoo import ZOO
from geomjobs.spec import job_schema

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def schema_keys(node, out=None):
    """Every property name anywhere in the schema, and every enum/const string value of a `kind`."""
    out = set() if out is None else out
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            out.add(name)
            if name == "kind" and isinstance(sub, dict):
                out.update(v for v in sub.get("enum", []) if isinstance(v, str))
                if isinstance(sub.get("const"), str):
                    out.add(sub["const"])
        for v in node.values():
            schema_keys(v, out)
    elif isinstance(node, list):
        for v in node:
            schema_keys(v, out)
    return out


def test_every_spec_key_latent_kind_and_zoo_model_is_in_the_reference():
    page = (ROOT / "docs" / "jobs.md").read_text()
    keys = schema_keys(job_schema())
    assert {"sampled", "trajectory", "gaussian", "images", "diffusers-unet", "seeds_per_prompt"} <= keys   # the walk works
    missing = sorted(k for k in keys | set(ZOO) if f"`{k}`" not in page)
    assert missing == [], f"docs/jobs.md does not mention {missing}"


def test_every_flag_is_documented_and_every_documented_flag_exists():
    flags = set()

    def walk(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for child in a.choices.values():
                    walk(child)
            elif a.help != argparse.SUPPRESS and not isinstance(a, argparse._VersionAction):
                flags.update(o for o in a.option_strings if o not in ("-h", "--help"))
                if isinstance(a, argparse.BooleanOptionalAction):
                    flags.discard(next(o for o in a.option_strings if o.startswith("--no-")))

    walk(build_parser())
    flags.add("--version")
    page = (ROOT / "docs" / "cli.md").read_text()
    documented = set(re.findall(r"`(--?[a-z][a-z-]*)", page))
    assert sorted(flags - documented) == [], "flags missing from docs/cli.md"
    reverse = documented - flags - {"--no-resume", "--help"}   # the negative form of --resume; every parser has --help
    assert sorted(reverse) == [], "docs/cli.md documents flags the CLI does not have"


def test_links_resolve_and_nothing_points_outside_the_repository():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "SPEC.md" not in text, page
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).resolve().exists(), f"{page.name}: broken link {target}"


def test_the_schema_walk_sees_the_whole_schema():
    raw = json.dumps(job_schema())
    named = set(re.findall(r'"properties": \{"([a-z_0-9]+)"', raw))
    assert named <= schema_keys(job_schema())
