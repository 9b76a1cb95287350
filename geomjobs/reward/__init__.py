"""Reward model r(z_t, t) -> psi: training data rebuilt from datasets, training, guidance, evaluation (SPEC sections 3 and 7)."""
