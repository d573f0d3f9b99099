"""Read the weights of a ``torch.export`` (``.pt2``) archive without unpickling anything.

Kept for callers of :func:`read_pt2_state_dict`; the reader, with its size checks, lives in
:mod:`tracin_tasks.core.weights`.
"""

from __future__ import annotations

from tracin_tasks.core.weights import read_pt2_file

read_pt2_state_dict = read_pt2_file

__all__ = ["read_pt2_state_dict"]
