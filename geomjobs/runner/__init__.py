"""Running jobs: plan (resolve + check, before any work), shards (pure (plan, i) -> records),
and the drivers that schedule shards (local in-process now; Ray on the cluster)."""
