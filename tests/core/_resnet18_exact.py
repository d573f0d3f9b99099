"""torchvision's ResNet-18 (``weights=None``, 32×32 inputs, BatchNorm in eval mode with non-trivial
running statistics): TracIn's self-influence against the float64 per-row autograd loop.

Run by tests/core/test_resnet18.py, in this process's environment when torchvision loads there,
else in the vision environment (``make vision``: a torch build that torchvision's wheels match).
Prints one JSON line: the largest relative error, the parameters left to the generic path, and the
versions used.
"""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # oracle.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

import oracle  # noqa: E402
from tracin_tasks import TracIn  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    checkpoints = oracle.build_checkpoints(model, lrs=(0.1, 0.02), seed=1, scale=0.05)
    x = torch.randn(4, 3, 32, 32)  # few rows: the float64 loop is slow
    y = torch.tensor([0, 3, 9, 3])
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("tracin_tasks").addHandler(Keep())
    tracin = TracIn(model, checkpoints, dtype=torch.float64)
    scores = tracin.self_influence(torch.utils.data.TensorDataset(x, y), batch_size=3)
    expected = oracle.self_influence(model, checkpoints, x, y)
    rel = float(np.max(np.abs(scores - expected) / np.abs(expected)))
    print(json.dumps({"max_rel_error": rel, "fallback": list(tracin._engine().fallback_names),
                      "warnings": warnings, "torch": torch.__version__, "torchvision": torchvision.__version__,
                      "rows": len(scores)}))


if __name__ == "__main__":
    main()
