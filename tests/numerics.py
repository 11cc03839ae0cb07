"""The suite's one error measure: relative error ||out - ref|| / ||ref|| in float64 (complex128 for
complex inputs). NaN or Inf in either side fails the test instead of producing a comparison that
silently passes."""

from __future__ import annotations

import numpy as np


def rel(out, ref) -> float:
  out, ref = np.asarray(out), np.asarray(ref)
  dtype = np.complex128 if np.iscomplexobj(out) or np.iscomplexobj(ref) else np.float64
  out, ref = out.astype(dtype), ref.astype(dtype)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(ref)), "NaN/Inf in a compared array"
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
