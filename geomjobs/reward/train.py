"""``geomjobs reward train``: fit r(z_t, t) -> target on the ok rows of geomjobs datasets (docs/reward.md).

Data (:mod:`geomjobs.reward.data`): the index columns of every dataset in memory, each batch's z_t
rebuilt from its dataset's spec (or read from its ``z`` column) on a background thread while the
previous batch trains. Rows are split by sample id into training and held-out sets.

Training: the network of :mod:`geomjobs.sampling.reward_net` on z normalised by the training rows'
scalar mean and std (estimated on up to :data:`NORM_ROWS` of them) and the target normalised by
its training mean and std; loss = mean squared error of the normalised target; optax AdamW with a
linear warm-up (5 % of the steps) and cosine decay to 1 % of ``lr``. Batch order is a function of
(seed, step) only: each epoch permutes blocks of :data:`CHUNK` consecutive training rows (so an
image source encodes each of its blocks once per visit), then shuffles rows within windows of
:data:`WINDOW` blocks. Every ``eval_every`` steps the held-out loss (on up to ``val_rows`` held-out
rows, a fixed subset) is measured; the best parameters are kept, and training stops after
``patience`` evaluations without improvement. A checkpoint (parameters, optimiser state, best
parameters, early-stopping state) is written under ``OUT/checkpoints/`` at every evaluation;
a run started again with the same datasets and options resumes from it and, since batches
depend on the step only, ends with the parameters an uninterrupted run gives.

``reward.json`` (:func:`geomjobs.sampling.reward_net.reward_meta` plus): ``datasets`` (uri, spec_hash,
job_id, where z came from, rows), ``training`` (the options), ``n_train``, ``n_val``, ``val_r2``,
``val_spearman``, ``val_rmse`` (on every held-out row, with the best parameters), ``best_step``,
``steps_run``, ``stopped_early``, ``history`` (step, train loss, held-out loss per evaluation).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from geomjobs.errors import SpecError
from geomjobs.reward.config import TrainConfig
from geomjobs.reward.data import RewardSource, open_sources, split_unit
from geomjobs.sampling import reward_net as rm
from geomjobs.sink.fs import filesystem, join, normalize_uri

CHUNK = 64          # consecutive training rows kept together in the batch order (= images' ENCODE_BLOCK)
WINDOW = 16         # blocks whose rows are shuffled together
NORM_ROWS = 4096    # training rows the latent mean / std are estimated on
CACHE_BYTES = 1 << 28   # held-out latents kept in memory between evaluations when they fit
CHECKPOINT = "checkpoints/state.msgpack"


# --------------------------------------------------------------------------------------------
# rows, split and batch order
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Rows:
    """Rows of several sources: source index and row index into that source's arrays."""
    src: np.ndarray      # (n,) int32
    row: np.ndarray      # (n,) int64

    def __len__(self):
        return len(self.row)

    def take(self, sel) -> Rows:
        return Rows(self.src[sel], self.row[sel])


def split_rows(sources: list[RewardSource], val_fraction: float) -> tuple[Rows, Rows]:
    src = np.concatenate([np.full(len(s.ids), i, np.int32) for i, s in enumerate(sources)])
    row = np.concatenate([np.arange(len(s.ids), dtype=np.int64) for s in sources])
    val = np.concatenate([split_unit(s.ids) < val_fraction for s in sources])
    return Rows(src[~val], row[~val]), Rows(src[val], row[val])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of 0..n-1: blocks of CHUNK consecutive rows permuted, then rows shuffled
    within windows of WINDOW blocks; a function of (seed, epoch) only."""
    rng = np.random.default_rng([seed, epoch, 7])
    blocks = [np.arange(b, min(b + CHUNK, n)) for b in range(0, n, CHUNK)]
    order = np.concatenate([blocks[i] for i in rng.permutation(len(blocks))]) if blocks else np.zeros(0, np.int64)
    w = CHUNK * WINDOW
    for lo in range(0, n, w):
        order[lo:lo + w] = order[lo:lo + w][rng.permutation(len(order[lo:lo + w]))]
    return order


class Batches:
    """Training batch of any step, drawn from (seed, step) only; prefetched one step ahead."""

    def __init__(self, sources, rows: Rows, batch_size: int, seed: int):
        self.sources, self.rows, self.seed = sources, rows, seed
        self.batch_size = min(batch_size, len(rows))
        self.per_epoch = len(rows) // self.batch_size
        self._orders: dict[int, np.ndarray] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._next: tuple[int, concurrent.futures.Future] | None = None

    def indices(self, step: int) -> np.ndarray:
        epoch, b = divmod(step, self.per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.rows), self.seed, epoch)}
        return self._orders[epoch][b * self.batch_size:(b + 1) * self.batch_size]

    def build(self, step: int):
        return gather(self.sources, self.rows.take(self.indices(step)))

    def get(self, step: int):
        fut = self._next[1] if self._next and self._next[0] == step else self._pool.submit(self.build, step)
        self._next = (step + 1, self._pool.submit(self.build, step + 1))
        return fut.result()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def gather(sources: list[RewardSource], rows: Rows):
    """(z float32 (m, *shape), t float32 (m,), y float64 (m,)) of these rows, z rebuilt per source."""
    shape = sources[0].latent_shape
    z = np.empty((len(rows), *shape), np.float32)
    t = np.empty(len(rows), np.float32)
    y = np.empty(len(rows), np.float64)
    for i in np.unique(rows.src):
        sel = np.flatnonzero(rows.src == i)
        r = rows.row[sel]
        order = np.argsort(r, kind="stable")            # sources read ascending ids
        z[sel[order]] = sources[i].z(r[order])
        t[sel] = sources[i].t[r]
        y[sel] = sources[i].y[r]
    return z, t, y


def iter_gather(sources, rows: Rows, batch: int):
    for lo in range(0, len(rows), batch):
        yield gather(sources, rows.take(slice(lo, lo + batch)))


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------

def r2_score(y, p) -> float:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    ss = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - p) ** 2)) / ss if ss > 0 else float("nan")


def spearman(y, p) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(y, p).statistic) if len(y) > 1 else float("nan")


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------

def _fingerprint(sources, target, cfg: TrainConfig) -> str:
    what = {"datasets": [[s.uri, s.spec_hash] for s in sources], "target": target, "config": dataclasses.asdict(cfg)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _normalisation(sources, train: Rows, seed: int) -> dict:
    y = np.concatenate([s.y[train.row[train.src == i]] for i, s in enumerate(sources)])
    pick = np.sort(np.random.default_rng([seed, 11]).permutation(len(train))[:NORM_ROWS])
    z, _, _ = gather(sources, train.take(pick))
    zs, ys = float(np.std(z)), float(np.std(y))
    return {"z_mean": float(np.mean(z)), "z_std": zs if zs > 0 else 1.0, "y_mean": float(np.mean(y)), "y_std": ys if ys > 0 else 1.0}


class _Checkpoints:
    def __init__(self, out: str):
        self.fs, self.root = filesystem(out)

    def load(self):
        path = join(self.root, CHECKPOINT)
        if not self.fs.exists(path):
            return None
        return serialization.msgpack_restore(self.fs.cat_file(path))

    def save(self, state: dict) -> None:
        path = join(self.root, CHECKPOINT)
        tmp = path + ".tmp"
        self.fs.makedirs(join(self.root, "checkpoints"), exist_ok=True)
        self.fs.pipe_file(tmp, serialization.msgpack_serialize(state))
        self.fs.mv(tmp, path)          # a reader never sees half a checkpoint (local: a rename)


def train(datasets: list[str], out: str, target: str = "local_scaling", config: TrainConfig = TrainConfig(), *,
          resume: bool = True, progress: bool = False, stop_after: int | None = None) -> dict:
    """Train and write the reward folder ``out``; returns its reward.json. ``stop_after``: return
    right after the checkpoint at that step, as a run killed there would (tests)."""
    config.check()
    out = normalize_uri(out)
    started = time.time()
    sources = open_sources(list(datasets), target)
    train_rows, val_rows = split_rows(sources, config.val_fraction)
    if len(train_rows) < 2 or len(val_rows) < 1:
        raise SpecError("--val-fraction", f"{len(train_rows) + len(val_rows)} usable rows split into {len(train_rows)} "
                                          f"for training and {len(val_rows)} held out; need at least 2 and 1")
    shape = sources[0].latent_shape
    net_cfg = rm.network_config(shape, hidden=config.hidden, depth=config.depth, temb=config.temb, channels=config.channels)
    net = rm.build_network(shape, net_cfg)
    fingerprint = _fingerprint(sources, target, config)
    ckpt = _Checkpoints(out)
    state = ckpt.load() if resume else None
    if state is not None and state["fingerprint"] != fingerprint:
        raise SpecError("--out", f"'{out}' holds a checkpoint of another training run (other datasets or options); "
                                 "pass --no-resume to start over, or another --out")

    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, max(1, config.steps // 20), config.steps, config.lr * 0.01)
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    params0 = rm.init_params(net, config.seed)
    if state is None:
        norm = _normalisation(sources, train_rows, config.seed)
        params, opt_state = params0, jax.jit(tx.init)(params0)
        best = {"params": params0, "loss": float("inf"), "step": 0}
        step, bad, history = 0, 0, []
    else:
        norm = {k: float(v) for k, v in state["norm"].items()}
        params = serialization.from_state_dict(params0, state["params"])
        opt_state = serialization.from_state_dict(jax.eval_shape(tx.init, params0), state["opt_state"])
        best = {"params": serialization.from_state_dict(params0, state["best_params"]),
                "loss": float(state["best_loss"]), "step": int(state["best_step"])}
        step, bad = int(state["step"]), int(state["bad"])
        history = json.loads(state["history"])
    zm, zs, ym, ys = norm["z_mean"], norm["z_std"], norm["y_mean"], norm["y_std"]

    def loss_fn(p, z, t, y):
        pred = net.apply({"params": p}, (z - zm) / zs, t)
        return jnp.mean((pred - (y - ym) / ys) ** 2)

    @jax.jit
    def train_step(p, o, z, t, y):
        loss, g = jax.value_and_grad(loss_fn)(p, z, t, y)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    predict = jax.jit(rm.normalised_apply(net, norm))

    def predictions(p, rows: Rows, cache=None):
        bs = 1024
        out_p, out_y = [], []
        batches = cache if cache is not None else iter_gather(sources, rows, bs)
        for z, t, y in batches:
            out_p.append(np.asarray(predict(p, jnp.asarray(z), jnp.asarray(t)), np.float64))
            out_y.append(y)
        return np.concatenate(out_p), np.concatenate(out_y)

    es_rows = val_rows
    if len(val_rows) > config.val_rows:       # a fixed subset for early stopping
        es_rows = val_rows.take(np.sort(np.argsort(split_unit(np.arange(len(val_rows))), kind="stable")[:config.val_rows]))
    row_bytes = 4 * int(np.prod(shape))
    es_cache = list(iter_gather(sources, es_rows, 1024)) if len(es_rows) * row_bytes <= CACHE_BYTES else None

    def val_loss(p):
        pr, y = predictions(p, es_rows, es_cache)
        return float(np.mean(((pr - y) / ys) ** 2))

    batches = Batches(sources, train_rows, config.batch_size, config.seed)
    stopped_early = bad >= config.patience
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="reward train", unit="step", file=sys.stderr)
    losses = []
    # throughput of the training loop (batches rebuilt on the fly), the first step (its compile)
    # and the evaluations / checkpoints left out
    clock = {"start": None, "steps": 0, "paused": 0.0}
    try:
        while step < config.steps and not stopped_early:
            z, t, y = batches.get(step)
            params, opt_state, loss = train_step(params, opt_state, jnp.asarray(z), jnp.asarray(t), jnp.asarray(y))
            step += 1
            losses.append(loss)
            if clock["start"] is None:
                jax.block_until_ready(loss)
                clock["start"] = time.perf_counter()
            else:
                clock["steps"] += 1
            if bar is not None:
                bar.update(1)
            if step % config.eval_every == 0 or step == config.steps:
                jax.block_until_ready(loss)
                paused = time.perf_counter()
                vl = val_loss(params)
                tl = float(np.mean(jax.device_get(losses))) if losses else float("nan")
                losses = []
                history.append([step, tl, vl])
                if vl < best["loss"]:
                    best, bad = {"params": params, "loss": vl, "step": step}, 0
                else:
                    bad += 1
                stopped_early = bad >= config.patience
                if bar is not None:
                    bar.set_postfix(train=f"{tl:.4f}", val=f"{vl:.4f}", best=best["step"])
                ckpt.save({"fingerprint": fingerprint, "step": step, "bad": bad, "norm": norm,
                           "params": serialization.to_state_dict(jax.device_get(params)),
                           "opt_state": serialization.to_state_dict(jax.device_get(opt_state)),
                           "best_params": serialization.to_state_dict(jax.device_get(best["params"])),
                           "best_loss": best["loss"], "best_step": best["step"], "history": json.dumps(history)})
                clock["paused"] += time.perf_counter() - paused
                if stop_after is not None and step >= stop_after:
                    return {"stopped_at": step}
        jax.block_until_ready(params)
    finally:
        batches.close()
        if bar is not None:
            bar.close()

    pr, y = predictions(best["params"], val_rows)
    t_train = np.concatenate([s.t[train_rows.row[train_rows.src == i]] for i, s in enumerate(sources)])
    meta = rm.reward_meta(
        shape, sources[0].num_train_timesteps, (float(t_train.min()), float(t_train.max())), target, net_cfg, norm,
        datasets=[{"uri": s.uri, "spec_hash": s.spec_hash, "job_id": s.job.get("job_id"), "latents_from": s.origin,
                   "rows": int(len(s.ids)), "n_train": int(np.sum(train_rows.src == i)), "n_val": int(np.sum(val_rows.src == i))}
                  for i, s in enumerate(sources)],
        training={**{k: v for k, v in dataclasses.asdict(config).items() if k not in ("hidden", "depth", "temb", "channels")},
                  "optimizer": "adamw", "schedule": "linear warm-up over 5% of steps, cosine decay to 1% of lr",
                  "loss": "mse of the target normalised by its training mean/std", "split": "split_unit(sample_id) < val_fraction"},
        n_train=int(len(train_rows)), n_val=int(len(val_rows)), val_r2=r2_score(y, pr), val_spearman=spearman(y, pr),
        val_rmse=float(np.sqrt(np.mean((y - pr) ** 2))), best_step=int(best["step"]), steps_run=int(step),
        stopped_early=bool(stopped_early), history=history, seconds=round(time.time() - started, 2),
        train_rows_per_s=_rate(clock, batches.batch_size))
    rm.save_reward(out, best["params"], meta)
    return meta


def _rate(clock: dict, batch: int) -> float | None:
    if clock["start"] is None or clock["steps"] == 0:
        return None
    busy = time.perf_counter() - clock["start"] - clock["paused"]
    return round(clock["steps"] * batch / busy, 1) if busy > 0 else None
