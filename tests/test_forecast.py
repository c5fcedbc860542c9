"""The residual forecast a hit adds: a polynomial through the last full steps, exact at any spacing."""
import pytest
import torch

from accel.strategies.forecast import ResidualForecast


def residual(step: float) -> torch.Tensor:
    """A residual that is a known polynomial of the step in each element: quadratic, linear, constant."""
    return torch.tensor([2.0 * step**2 - 3.0 * step + 1.0, -0.5 * step + 4.0, 7.0], dtype=torch.float64)


@pytest.mark.parametrize("steps", [(0, 3, 4), (1, 2, 3), (2, 7, 8), (0, 1, 5)])
def test_order_two_extrapolates_a_quadratic_exactly_at_uneven_steps(steps):
    forecast = ResidualForecast(order=2)
    for step in steps:
        forecast.update(step, residual(step))
    for ahead in (steps[-1] + 1, steps[-1] + 3, steps[-1] + 0.5):
        assert torch.allclose(forecast.predict(ahead), residual(ahead), rtol=0, atol=1e-9), ahead


def test_order_one_extrapolates_a_line_exactly_and_uses_only_the_last_two_steps():
    line = lambda s: torch.tensor([3.0 * s - 2.0], dtype=torch.float64)  # noqa: E731
    forecast = ResidualForecast(order=1)
    forecast.update(0, torch.tensor([100.0], dtype=torch.float64))  # an old point the line does not pass through
    for step in (4, 6):
        forecast.update(step, line(step))
    assert forecast.predict(9).item() == pytest.approx(line(9).item(), abs=1e-12)


def test_order_zero_reuses_the_last_full_residual():
    forecast = ResidualForecast(order=0)
    forecast.update(0, residual(0))
    forecast.update(2, residual(2))
    assert torch.equal(forecast.predict(5), residual(2))


def test_a_forecast_with_fewer_points_than_its_order_uses_those_it_has():
    forecast = ResidualForecast(order=2)
    forecast.update(3, residual(3))
    assert torch.equal(forecast.predict(4), residual(3))  # one point: the residual itself
    forecast.update(5, residual(5))
    slope = (residual(5) - residual(3)) / 2
    assert torch.allclose(forecast.predict(6), residual(5) + slope)  # two points: the line through them


def test_a_step_that_does_not_move_forward_starts_the_forecast_over():
    forecast = ResidualForecast(order=2)
    for step in (0, 1, 2):
        forecast.update(step, residual(step) * 10)
    forecast.update(0, residual(0))  # a new generation
    assert forecast.steps == [0] and torch.equal(forecast.predict(3), residual(0))
