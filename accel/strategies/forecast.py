"""What a cache hit puts in place of the skipped blocks' residual.

Order 0 reuses the residual of the last full step (FBCache, TeaCache). Order k > 0 forecasts it,
TaylorSeer-style, from the last k + 1 full steps: the polynomial of degree k through them, in Newton's
form, evaluated at the skipped step,

    R(s) ≈ R[s_n] + R[s_n, s_n-1]·(s − s_n) + R[s_n, s_n-1, s_n-2]·(s − s_n)(s − s_n-1) + …

with R[...] the divided differences (R[a, b] = (R[a] − R[b]) / (a − b), and so on). Full steps are
uneven once hits fall between them, and divided differences over the real steps make the forecast
exact for a residual that is a polynomial of degree <= k at any spacing (TaylorSeer's differences
divided by the span to the previous step are exact for order 1 only). Memory: k + 1 tensors.
"""
from __future__ import annotations

from typing import Optional

import torch


class ResidualForecast:
    def __init__(self, order: int = 0):
        self.order = order
        self.terms: list[torch.Tensor] = []  # R[s_n], R[s_n, s_n-1], ..., newest step first
        self.steps: list[int] = []  # s_n, s_n-1, ...: the full steps the terms are over

    @property
    def step(self) -> Optional[int]:
        return self.steps[0] if self.steps else None

    def update(self, step: int, residual: torch.Tensor) -> None:
        """A full step's residual: the newest point of the polynomial."""
        if self.steps and step <= self.steps[0]:  # a step again (a new generation reuses no state): start over
            self.terms, self.steps = [], []
        steps = [step, *self.steps][: self.order + 1]
        terms = [residual]
        for k in range(1, len(steps)):
            terms.append((terms[k - 1] - self.terms[k - 1]) / (steps[0] - steps[k]))
        self.terms, self.steps = terms, steps

    def predict(self, step: int) -> torch.Tensor:
        """The residual forecast at `step` (the residual itself at order 0)."""
        estimate, product = self.terms[0], 1.0
        for k in range(1, len(self.terms)):
            product *= step - self.steps[k - 1]
            estimate = estimate + self.terms[k] * product
        return estimate

    def fits(self, like: torch.Tensor) -> bool:
        held = self.terms[0]
        return held.shape == like.shape and held.dtype == like.dtype and held.device == like.device
