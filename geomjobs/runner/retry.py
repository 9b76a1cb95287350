"""The retry policy of both drivers: a shard is tried at most ``max_retries + 1`` times.

Every failed attempt counts, whatever failed (the shard's computation raised, or the Ray worker
holding it died), so a shard that kills every worker it touches cannot loop forever. When a
shard's attempts are used up its last error is recorded in the dataset
(``Dataset.record_failure``) and the job goes on with the other shards.
"""
from __future__ import annotations

import collections
import traceback

from geomjobs.sink.dataset import Dataset


def format_exception(e: BaseException) -> str:
    """An attempt's error as recorded (failure records, worker-death lines): the exception's
    type and message, without the traceback."""
    return "".join(traceback.format_exception_only(type(e), e)).strip()


class Retries:
    """Counts the failed attempts of each shard of one run and decides: try again, or record."""

    def __init__(self, max_retries: int, ds: Dataset):
        self.max_retries = max_retries
        self.ds = ds
        self.attempts: dict[int, int] = collections.defaultdict(int)

    def failed(self, shard: int, error: str) -> bool:
        """One attempt of ``shard`` failed with ``error``. True: try it again. False: that was
        its last attempt, and the failure is now recorded in the dataset."""
        self.attempts[shard] += 1
        if self.attempts[shard] <= self.max_retries:
            return True
        self.ds.record_failure(shard, error, self.attempts[shard])
        return False
