"""The reward application (docs/reward.md): training data rebuilt from datasets, training of
r(z_t, t) -> psi, evaluation of guided sampling. The network r and the guidance hook that samplers
use live one floor down, in :mod:`geomjobs.sampling` (``reward_net``, ``guidance``)."""
