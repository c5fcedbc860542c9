"""What a run tells a user: a speedup only where the timed rounds tell the variants apart."""
import numpy as np

from accel.report import comparison, quality, summary_table, timing_summary

IMAGES = np.zeros((1, 8, 8, 3))


def _report(baseline_s, accelerated_s):
    base = comparison(baseline_s, accelerated_s, images=1, steps=4, figures=quality(None, IMAGES, IMAGES))
    return {
        "recipe": {"model": {"architecture": "flux", "source": "tiny"}},
        "stats": {},
        "timings": {"load_s": 1.0, "apply_s": 0.001, "first_call_s": 1.0, "first_call_extra_s": 0.1, "accelerated": timing_summary(accelerated_s, 1, 4)},
        "baseline": base,
        "outputs": [],
    }


def test_overlapping_rounds_are_no_measurable_difference():
    report = _report([1.0, 1.4, 1.1], [0.9, 1.2, 1.05])
    assert report["baseline"]["measurable"] is False
    assert "no measurable difference" in summary_table(report)


def test_separate_rounds_give_the_median_speedup_and_its_range():
    report = _report([2.0, 2.2, 2.1], [1.0, 1.1, 1.05])
    base = report["baseline"]
    assert base["measurable"] and base["speedup"] == round(2.1 / 1.05, 3)
    assert base["speedup_range"] == [round(2.0 / 1.1, 3), round(2.2 / 1.0, 3)]
    assert "2.00x (range 1.82-2.20x over 3 rounds)" in summary_table(report)


def test_identical_outputs_read_as_identical():
    table = summary_table(_report([2.0, 2.2, 2.1], [1.0, 1.1, 1.05]))
    assert "PSNR inf (identical)" in table and "(bit-identical)" in table


def test_task_accuracy_is_scored_for_the_output_and_the_baseline_each():
    from accel.toy import shapes

    pictures, prompts = shapes.dataset(3, seed=5)
    figures = quality(["task_accuracy"], pictures / 255, np.zeros_like(pictures, dtype=float), prompts=prompts)
    assert figures["task_accuracy"] == 1.0 and figures["baseline_task_accuracy"] == 0.0


def test_a_comparison_of_one_round_is_never_called_measurable():
    report = _report([2.0], [1.0])
    assert report["baseline"]["measurable"] is False
    assert "one round cannot tell it from noise" in summary_table(report)


def test_a_table_with_only_uncomputed_figures_has_no_empty_quality_row():
    from accel.report import quality_rows

    rows = quality_rows({"lpips": None, "identical": False, "unavailable": {"lpips": "the lpips package is not installed"}})
    assert rows == [("not computed", "lpips: the lpips package is not installed")]
    assert quality_rows({"identical": True}) == [("vs baseline", "bit-identical")]


def test_a_first_call_no_slower_than_a_steady_one_is_said_so_never_as_a_negative_time():
    report = _report([2.0, 2.2, 2.1], [1.0, 1.1, 1.05])
    report["timings"]["first_call_extra_s"] = 0.0
    table = summary_table(report)
    assert "first call      1.000 s (no slower than a steady one)" in table and "-" not in table.split("first call")[1].split("\n")[0]
