"""What a cache hit puts in place of the skipped blocks' residual.

Order 0 reuses the residual of the last full step (FBCache, TeaCache). Higher orders keep
finite-difference derivatives over the full steps, TaylorSeer-style, and extrapolate:
R(step) ≈ Σ_k dR_k · Δ^k / k!, with Δ the steps since the last full step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


class ResidualForecast:
    def __init__(self, order: int = 0):
        self.order = order
        self.terms: list[torch.Tensor] = []  # R, dR/ds, d²R/ds², ... at `step`
        self.step: Optional[int] = None

    def update(self, step: int, residual: torch.Tensor) -> None:
        terms = [residual]
        if self.step is not None and step > self.step:
            span = step - self.step
            for k in range(min(self.order, len(self.terms))):
                terms.append((terms[k] - self.terms[k]) / span)
        self.terms, self.step = terms, step

    def predict(self, step: int) -> torch.Tensor:
        estimate = self.terms[0]
        span = step - self.step
        for k, term in enumerate(self.terms[1:], start=1):
            estimate = estimate + term * (span**k / math.factorial(k))
        return estimate

    def fits(self, like: torch.Tensor) -> bool:
        held = self.terms[0]
        return held.shape == like.shape and held.dtype == like.dtype and held.device == like.device
