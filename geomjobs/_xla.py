"""XLA flags the package sets before the first computation (``geomjobs/__init__`` applies them).

XLA:CPU's YNN ``reduce`` fusion (jaxlib 0.10.2, on by default) miscompiles a reduction over the
feature axis of a batched VJP: a LayerNorm's mean inside ``vmap(vmap(vjp))`` under ``jit`` gives
rows that are wrong by O(1) once the outer batch reaches 4, while the same program per sample, or
without jit, is right. geomjobs' job step is exactly that shape (the k cotangents vmapped inside
a batch vmap): dit-digits' psi at batch 16 was off by up to 0.19 against the Jacobian's own
log-determinant (tests/test_xla_flags.py has a ten-line reproducer). So the package removes that
fusion type, ``--xla_cpu_experimental_ynn_fusion_type=-reduce``, unless XLA_FLAGS already names
the option (a user's own choice stands). XLA reads XLA_FLAGS when its backend starts, so this
works when geomjobs is imported before the first JAX computation; :func:`backend_started` tells.

The flag is set only for the jaxlib series it was verified on (:data:`VERIFIED`, read from the
installed package's metadata without importing jax): XLA aborts at start-up on a flag it does not
know, so an older or newer jaxlib that dropped or never had this option must not be given it.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata

YNN_OPTION = "--xla_cpu_experimental_ynn_fusion_type"
WORKAROUND = f"{YNN_OPTION}=-reduce"
VERIFIED = ("0.10.",)   # jaxlib series where the miscompile was reproduced and the flag checked


def affected(version: str | None = None) -> bool:
    """Whether the installed jaxlib (or ``version``) is a series the workaround is verified on."""
    if version is None:
        try:
            version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return False
    return version.startswith(VERIFIED)


def apply(environ=None) -> bool:
    """Add :data:`WORKAROUND` to ``environ["XLA_FLAGS"]`` (default ``os.environ``) unless the
    option is already there or the installed jaxlib is not one it was verified on; True when it
    was added."""
    environ = os.environ if environ is None else environ
    if not affected():
        return False
    flags = environ.get("XLA_FLAGS", "")
    if YNN_OPTION in flags:
        return False
    environ["XLA_FLAGS"] = f"{flags} {WORKAROUND}".strip()
    return True


def backend_started() -> bool:
    """Whether a JAX backend was initialized in this process (then XLA_FLAGS set now is not read)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))
