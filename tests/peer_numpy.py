"""A stand-in for benchmarks/peer_torch.py that needs no torch: the same pipe protocol (one JSON
request per line on stdin, one JSON answer per line on stdout), for the ``mlp`` case only, with
psi from the MLP's Jacobian written out by hand in NumPy (float64):

    A(z) = W_L^T D_{L-1} W_{L-1}^T ... D_0 W_0^T,   D_i = diag(h_i > 0) (ReLU's derivative),
    psi(z) = sum log svdvals(W A(z)).

Used by tests/test_bench_peer.py to run bench_peer.py end to end (``--smoke``) where torch is
absent: geomjobs' psi, by jax.vjp and XLA, against an independent closed-form Jacobian. A
``dtype: bfloat16`` request rounds the weights and latents to bfloat16 (NumPy has no bf16
arithmetic, so the rest stays float64: the figure is a check of the protocol, not of bf16)."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float64."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


class Case:
    def __init__(self, folder: str, dtype: str):
        with open(os.path.join(folder, "case.json")) as f:
            case = json.load(f)
        if case["kind"] != "mlp":
            raise ValueError(f"peer_numpy handles the mlp case only, not {case['kind']!r}")
        cast = bf16_round if dtype == "bfloat16" else (lambda a: np.asarray(a, np.float64))
        arrays = dict(np.load(os.path.join(folder, "weights.npz")))
        n = len([k for k in arrays if k.startswith("W")])
        self.layers = [(cast(arrays[f"W{i}"]), cast(arrays[f"b{i}"])) for i in range(n)]
        self.w = np.load(os.path.join(folder, "W64.npy" if dtype == "float64" else "W.npy")).astype(np.float64)
        self.z = cast(np.load(os.path.join(folder, "z.npy")))

    def psi(self) -> list[float]:
        out = []
        for z in self.z:
            h, jac = z, np.eye(z.shape[0])                      # jac: d h / d z, (width, d)
            for i, (kernel, bias) in enumerate(self.layers):
                pre = h @ kernel + bias
                jac = kernel.T @ jac
                if i < len(self.layers) - 1:
                    mask = pre > 0
                    h, jac = np.where(mask, pre, 0.0), jac * mask[:, None]
            out.append(float(np.sum(np.log(np.linalg.svd(self.w @ jac, compute_uv=False)))))
        return out


def serve() -> None:
    cases: dict[tuple, Case] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            key = (req["case"], req.get("dtype", "float32"))
            if req["op"] == "load" or key not in cases:
                cases[key] = Case(*key)
            c = cases[key]
            if req["op"] == "load":
                ans = {"psi": c.psi(), "variant": "per-sample", "choice": {}, "torch": f"numpy {np.__version__} (stand-in)",
                       "threads": 1}
            elif req["op"] == "time":
                secs = []
                for _ in range(int(req.get("repeats", 1))):
                    t = time.perf_counter()
                    psi = c.psi()
                    secs.append(time.perf_counter() - t)
                ans = {"seconds": secs, "psi": psi}
            elif req["op"] == "profile":
                ans = {"ops": []}
            else:
                raise ValueError(f"unknown op {req['op']!r}")
        except Exception as e:  # noqa: BLE001 - the harness reports it
            ans = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(ans), flush=True)


if __name__ == "__main__":
    serve()
