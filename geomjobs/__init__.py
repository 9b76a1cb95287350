"""geomjobs: local geometry (psi, nu, delta) of generative models, as batch jobs.

The public entry points: :func:`run_job` (what ``geomjobs run`` calls) and :func:`open_dataset`.
Submodules: ``geometry`` (the mathematics, pure JAX), ``generators``, ``latents``, ``runner``,
``sink``, ``cli``.
"""
from geomjobs import _xla
from geomjobs._version import __version__

_xla.apply()   # XLA:CPU flags before the first computation (geomjobs/_xla.py: a miscompiled fusion)

__all__ = ["__version__", "open_dataset", "run_job"]


def run_job(spec, out=None, *, progress=False, address=None, resume=None):
    """Run a job spec (a mapping, or a path to YAML) and return a JobResult.

    One rule for every run: an output that holds this same job is finished (shards already
    committed are kept); one that holds another job is refused. ``resume`` is accepted from
    scripts written before that rule and changes nothing."""
    from geomjobs.runner import run_default
    from geomjobs.spec import load_spec

    if not isinstance(spec, dict):
        spec = load_spec(spec)
    if address is not None:
        # a Ray cluster: "HOST:PORT", "auto" (inside a submitted job) or "local" (embedded Ray)
        from geomjobs.runner.ray_driver import run_ray

        return run_ray(spec, out, address=address, progress=progress)
    # local mode: the same Ray driver on an embedded Ray, or in process for small jobs
    return run_default(spec, out, progress=progress)


def open_dataset(uri):
    from geomjobs.sink.dataset import Dataset

    return Dataset(uri)
