"""The sweep summary's Pareto front: the settings no other beats on both speed and quality."""
from accel.sweep_report import pareto_front


def test_the_front_keeps_exactly_the_unbeaten_points_in_speed_order():
    points = [(1.0, 60.0), (1.5, 50.0), (1.4, 45.0), (2.0, 30.0), (2.0, 20.0), (0.9, 59.0)]
    # (1.4, 45) is beaten by (1.5, 50); (2.0, 20) by (2.0, 30); (0.9, 59) by (1.0, 60)
    assert pareto_front(points) == [0, 1, 3]


def test_equal_points_are_both_on_the_front():
    assert pareto_front([(1.0, 40.0), (1.0, 40.0), (0.5, 30.0)]) == [0, 1]


def test_jobs_whose_timings_overlap_the_baseline_are_marked_and_kept_off_the_front(tmp_path):
    """A job that cached nothing and timed 1.2x by noise is no point of the trade-off: the table says
    "no measurable difference" and the front is drawn through measured speedups only."""
    import json

    from accel.sweep_report import front_of, write

    speeds = {0: (1.2, False, "inf"), 1: (1.8, True, 45.0), 2: (1.5, True, 50.0)}
    for num, (speedup, measurable, psnr) in speeds.items():
        folder = tmp_path / str(num) / ".hydra"
        folder.mkdir(parents=True)
        (folder / "overrides.yaml").write_text(f"- cache.residual_diff_threshold={num / 10}\n")
        report = {"timings": {"accelerated": {"per_image_s": 1.0}}, "outputs": [],
                  "stats": {"cache": {"computed": 4, "cached": num, "hit_map": ["C" * (4 - num) + "H" * num]}},
                  "baseline": {"speedup": speedup, "measurable": measurable, "timings": {"per_image_s": speedup},
                               "quality": {"psnr": psnr, "ssim": 1.0}}}
        (folder.parent / "report.json").write_text(json.dumps(report))
    jobs = write(tmp_path, {})
    assert [j.num for j in front_of(jobs)] == [2, 1]  # the noisy 1.2x at inf dB would otherwise top the front
    table = (tmp_path / "summary.md").read_text()
    assert table.count("(no measurable difference)") == 1 and "| 1.2 (no measurable difference) |" in table
