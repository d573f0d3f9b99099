"""What one pass over the data at one checkpoint gives per row, and the sums over passes.

A pass (:class:`tracin_tasks.core.tracin.CheckpointPass`) holds, per row, the squared norm of
the loss gradient at that checkpoint and the signals the forward pass gives for free. Audits
store a pass per cell (one checkpoint × one shard of rows) and combine them with
:class:`PassSums`, the same sums :meth:`TracIn.self_influence` makes in one process:

* ``self_influence`` = Σ_c η_c ‖∇ℓ(θ_c, z)‖²;
* ``aum`` = the margin of the given label, averaged over the checkpoints (area under the margin);
* ``loss_final``, ``predicted``, ``confidence``: at the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

#: the per-row arrays of one pass, in the order they are stored
PASS_FIELDS = ("squared_norm", "loss", "margin", "predicted", "confidence")


class PassSums:
    """Accumulates passes, given row range by row range, into per-row results.

    Args:
        n_rows: rows in the data.
        steps: the steps of every checkpoint the passes come from (the last one gives the final
            signals; their count averages the margin).
    """

    def __init__(self, n_rows: int, steps: Iterable[int]):
        self.steps = sorted(set(int(s) for s in steps))
        self.last = self.steps[-1]
        self.out = {
            "self_influence": np.zeros(n_rows),
            "aum": np.zeros(n_rows),
            "loss_final": np.full(n_rows, np.nan),
            "predicted": np.full(n_rows, -1, dtype=np.int64),
            "confidence": np.full(n_rows, np.nan),
        }

    def add(self, step: int, learning_rate: float, rows: slice, arrays: Mapping[str, np.ndarray]) -> None:
        """One pass over ``rows`` at the checkpoint of ``step``."""
        self.out["self_influence"][rows] += learning_rate * arrays["squared_norm"]
        self.out["aum"][rows] += arrays["margin"] / len(self.steps)
        if step == self.last:
            self.out["loss_final"][rows] = arrays["loss"]
            self.out["predicted"][rows] = arrays["predicted"]
            self.out["confidence"][rows] = arrays["confidence"]

    def result(self) -> dict[str, np.ndarray]:
        return self.out
