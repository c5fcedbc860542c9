"""The sweep summary's Pareto front: the settings no other beats on both speed and quality."""
from accel.sweep_report import pareto_front


def test_the_front_keeps_exactly_the_unbeaten_points_in_speed_order():
    points = [(1.0, 60.0), (1.5, 50.0), (1.4, 45.0), (2.0, 30.0), (2.0, 20.0), (0.9, 59.0)]
    # (1.4, 45) is beaten by (1.5, 50); (2.0, 20) by (2.0, 30); (0.9, 59) by (1.0, 60)
    assert pareto_front(points) == [0, 1, 3]


def test_equal_points_are_both_on_the_front():
    assert pareto_front([(1.0, 40.0), (1.0, 40.0), (0.5, 30.0)]) == [0, 1]
