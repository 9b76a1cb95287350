"""Job specs: load YAML, validate against ``geomjobs/schemas/job.schema.json``, fill defaults.

Validation happens in two steps, both before any sample is computed:
1. :func:`load_spec` / :func:`validate_spec` check the document against the JSON schema and
   fill the defaults that need no model (``execution``, the latent source's seed and scale).
2. :func:`geomjobs.runner.plan.plan_job` builds the generator and latent source, and each
   descriptor (geomjobs/descriptors/) fills all of its section's defaults (seeds, radii, and
   those that depend on the sizes: projection ``k``, ``mode``, ``directions``), checking that
   they fit (``k <= n``, ``directions <= d``); the plan checks latent shape == model input.
Every problem raises :class:`SpecError` naming the key and what was expected; the CLI turns it
into exit code 2.
"""
from __future__ import annotations

import copy
import hashlib
import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from geomjobs.errors import SpecError  # its home; geomjobs.spec.SpecError stays importable

# model keys renamed since a release wrote them into specs, per model kind: old name -> new name.
# The old name is still accepted (renamed, with a one-line warning); the spec identity compares
# new names, and spec_hash spells them the old way, so a job stored before the rename keeps its
# hash (and default job_id) and resumes. guidance_scale -> cfg_scale: the record column
# guidance_scale is the *reward* guidance scale (latents.guidance.scale).
RENAMED_MODEL_KEYS = {"diffusers-unet": {"guidance_scale": "cfg_scale"}}
EXECUTION_DEFAULTS = {"shard_size": 256, "batch_size": 16, "dtype": "float32", "max_retries": 3}
# Keys that change how a job runs but not what it computes: a resume may change them.
RUN_ONLY_KEYS = ("batch_size", "workers", "resources", "max_retries")


def job_schema() -> dict:
    return json.loads(resources.files("geomjobs.schemas").joinpath("job.schema.json").read_text())


def _key(path) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "<root>"


def explain_schema_error(err: jsonschema.ValidationError) -> SpecError:
    """One readable message per schema error: the key, what was expected, what was found."""
    key = _key(err.absolute_path)
    v = err.validator
    if v == "required":
        missing = [m for m in err.validator_value if m not in (err.instance or {})]
        where = _key(list(err.absolute_path) + [missing[0]]) if missing else key
        kind = err.instance.get("kind") if isinstance(err.instance, dict) else None
        return SpecError(where, "is required" + (f" for kind '{kind}'" if kind is not None else ""))
    if v == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        where = _key(list(err.absolute_path) + [extra[0]]) if extra else key
        return SpecError(where, f"is not a known key here; expected one of {allowed}")
    if v == "const":
        return SpecError(key, f"expected {err.validator_value!r}, got {err.instance!r}")
    if v == "enum":
        return SpecError(key, f"expected one of {err.validator_value}, got {err.instance!r}")
    if v == "type":
        return SpecError(key, f"expected {err.validator_value}, got {type(err.instance).__name__} {err.instance!r}")
    if v in ("minimum", "exclusiveMinimum", "maximum"):
        return SpecError(key, f"expected a number {'>=' if v == 'minimum' else '>' if v == 'exclusiveMinimum' else '<='} "
                              f"{err.validator_value}, got {err.instance!r}")
    if v in ("minItems", "maxItems"):
        return SpecError(key, f"expected {'at least' if v == 'minItems' else 'at most'} {err.validator_value} items, "
                              f"got {len(err.instance)}")
    if v == "minProperties":
        return SpecError(key, f"expected at least one of {sorted(err.schema.get('properties', {}))}, got none")
    if v in ("oneOf", "anyOf") and "description" in err.schema:
        return SpecError(key, f"expected {err.schema['description']}, got {err.instance!r}")
    return SpecError(key, err.message)


def _model_sections(spec: dict):
    """(dotted key, section) of the model sections a spec holds: ``model`` and ``latents.model``."""
    lat = spec.get("latents")
    for key, section in (("model", spec.get("model")), ("latents.model", lat.get("model") if isinstance(lat, dict) else None)):
        if isinstance(section, dict):
            yield key, section


def current_model_keys(model: dict, key: str = "model", *, warn: bool = True) -> dict:
    """A model section with its renamed keys (:data:`RENAMED_MODEL_KEYS`) under their new names,
    in place of the old ones (the section itself when there are none); with ``warn``, one
    FutureWarning per old key naming the new one. SpecError when both names are given."""
    renames = {old: new for old, new in RENAMED_MODEL_KEYS.get(model.get("kind"), {}).items() if old in model}
    for old, new in renames.items():
        if new in model:
            raise SpecError(f"{key}.{old}", f"give only '{key}.{new}' ('{old}' is its old name)")
        if warn:
            warnings.warn(f"spec key '{key}.{old}' is deprecated: use '{key}.{new}'", FutureWarning, stacklevel=3)
    return {renames.get(k, k): v for k, v in model.items()} if renames else model


def with_current_keys(spec: dict, *, warn: bool = False) -> dict:
    """A copy of a spec (one a user wrote, or one an older release stored) whose model sections
    use the current key names (:func:`current_model_keys`); anything but a mapping as it is."""
    if not isinstance(spec, dict):
        return spec
    spec = copy.deepcopy(spec)
    for key, section in list(_model_sections(spec)):
        new = current_model_keys(section, key, warn=warn)
        if key == "model":
            spec["model"] = new
        else:
            spec["latents"]["model"] = new
    return spec


def validate_spec(raw: Any) -> dict:
    """Schema-check a spec mapping and return a copy with model-independent defaults filled
    (and renamed model keys under their new names, with a warning)."""
    if not isinstance(raw, dict):
        raise SpecError("", f"a job spec must be a mapping, got {type(raw).__name__}")
    raw = with_current_keys(raw, warn=True)
    validator = jsonschema.Draft202012Validator(job_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: (len(list(e.absolute_path)), str(list(e.absolute_path))))
    if errors:
        # The deepest error says most; jsonschema's best_match prefers it.
        raise explain_schema_error(jsonschema.exceptions.best_match(errors))
    spec = copy.deepcopy(raw)
    spec["execution"] = {**EXECUTION_DEFAULTS, **spec.get("execution", {})}
    lat = spec["latents"]
    if lat["kind"] == "gaussian":
        lat.setdefault("seed", 0)
        lat.setdefault("scale", 1.0)
    if lat["kind"] == "plane3":
        lat.setdefault("margin", 0.25)
    return spec


def load_yaml(path: str | Path) -> Any:
    """A spec file's YAML, unvalidated; SpecError when the file is missing or not YAML."""
    p = Path(path)
    if not p.is_file():
        raise SpecError("", f"spec file '{path}' does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError("", f"spec file '{path}' is not valid YAML: {e}") from None


def load_spec(path: str | Path) -> dict:
    """Read a YAML spec file and validate it (see :func:`validate_spec`)."""
    return resolve_paths(validate_spec(load_yaml(path)), Path(path).parent)


MODEL_PATH_KEYS = ("weights", "path", "prompt_embeddings")


def path_places(spec: dict) -> list[tuple[str, dict, str]]:
    """(dotted key, holder, key) of every local-path key a spec can hold: the model's files, a
    latent source's ``uri``, an image encoder's folder, a sampling model's files and a guiding
    reward folder."""
    places = []
    lat = spec.get("latents", {})
    for label, section in (("model", spec.get("model")), ("latents.model", lat.get("model"))):
        if isinstance(section, dict):
            places += [(f"{label}.{k}", section, k) for k in MODEL_PATH_KEYS if k in section]
    if "uri" in lat:
        places.append(("latents.uri", lat, "uri"))
    if isinstance(lat.get("encoder"), dict) and "path" in lat["encoder"]:
        places.append(("latents.encoder.path", lat["encoder"], "path"))
    if isinstance(lat.get("guidance"), dict) and "reward" in lat["guidance"]:
        places.append(("latents.guidance.reward", lat["guidance"], "reward"))
    return places


def resolve_paths(spec: dict, base: str | Path) -> dict:
    """Make local paths named in a spec absolute. A spec file's relative paths are relative to
    the file's folder (so a spec and its weights travel together); a mapping's, to the cwd.
    Workers on other machines then see the same absolute paths (or URIs)."""
    for _, holder, key in path_places(spec):
        v = holder.get(key)
        if isinstance(v, str) and "://" not in v and not Path(v).is_absolute():
            holder[key] = str((Path(base) / v).resolve())
    return spec


def identity(spec: dict) -> dict:
    """The part of a resolved spec that decides what is computed (and so what resume checks), with
    current key names (a spec stored by an older release compares equal to its rerun)."""
    s = with_current_keys(spec)
    s.pop("output", None)
    s.pop("job_id", None)
    for k in RUN_ONLY_KEYS:
        s.get("execution", {}).pop(k, None)
    return s


def spec_hash(spec: dict) -> str:
    """sha256 of the spec's identity, with renamed model keys spelled the old way
    (:data:`RENAMED_MODEL_KEYS`): the hash of every job an older release stored stays valid."""
    s = identity(spec)
    for _, section in _model_sections(s):
        for old, new in RENAMED_MODEL_KEYS.get(section.get("kind"), {}).items():
            if new in section:
                section[old] = section.pop(new)
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two spec mappings (for resume refusals)."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, key + ".")
        elif va != vb:
            out.append(key)
    return out
