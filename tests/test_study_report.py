"""Issue #8's study report (benchmarks/mamujoco.py): confidence intervals and stuck seeds."""

import json

import numpy as np
import pytest
from scipy import stats

from benchmarks.mamujoco import difference_cis, study_curves, study_report


def test_welch_interval_matches_scipy_and_bootstrap_brackets_the_difference():
    values, base = [2600.0, 2400.0, 2900.0, 2500.0, 2700.0], [2200.0, 2500.0, 1900.0, 2300.0, 2100.0]
    (w_lo, w_hi), (b_lo, b_hi) = difference_cis(values, base)
    reference = stats.ttest_ind(values, base, equal_var=False).confidence_interval(0.95)
    scale = 100 / np.mean(base)
    assert (w_lo, w_hi) == pytest.approx((reference.low * scale, reference.high * scale), rel=1e-9)
    gain = 100 * (np.mean(values) - np.mean(base)) / np.mean(base)
    assert b_lo < gain < b_hi
    assert w_lo > 0  # a clear gain: the interval excludes 0
    assert all(np.isnan(x) for pair in difference_cis([1.0], base) for x in pair)


def test_study_report_counts_stuck_seeds_and_reports_the_difference(tmp_path):
    finals = {"uniform": [2000.0, 2200.0, 2400.0], "kkt-shrink": [2500.0, 900.0, 2600.0]}
    with (tmp_path / "final.jsonl").open("w") as f:
        for variant, returns in finals.items():
            for seed, value in enumerate(returns):
                record = {"env": "mamujoco:HalfCheetah-2x3", "allocator": variant, "seed": seed}
                f.write(json.dumps({**record, "eval_return_mean": value}) + "\n")
    table = study_report(tmp_path, ["mamujoco:HalfCheetah-2x3"], ["uniform", "kkt-shrink"], [0, 1, 2])
    row = next(line for line in table.splitlines() if "| kkt-shrink |" in line)
    assert "| 3 | 2000 ± 954 | -9.1% |" in row
    assert "| 1/3 | n/a |" in row  # 900 < half of uniform's median 2200; no progress files: no KL figure
    assert "| 0/3 |" in next(line for line in table.splitlines() if "| uniform |" in line)


def test_study_report_compares_every_variant_at_the_same_budget(tmp_path):
    # A staged study: kkt seed 1 finished at 500k only; uniform and kkt seed 0 went on to 1M.
    env = "mamujoco:HalfCheetah-2x3"
    evals = {
        ("uniform", 0): {500_000: 4000.0, 1_000_000: 5000.0},
        ("uniform", 1): {500_000: 4200.0, 1_000_000: 5400.0},
        ("kkt", 0): {500_000: 4100.0, 1_000_000: 5200.0},
        ("kkt", 1): {500_000: 3000.0},
    }
    with (tmp_path / "final.jsonl").open("w") as f:
        for (variant, seed), by_step in evals.items():
            folder = tmp_path / "mamujoco_HalfCheetah-2x3" / variant / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "eval.jsonl").write_text(
                "".join(json.dumps({"timesteps": t, "mean": m, "std": 0.0}) + "\n" for t, m in by_step.items())
            )
            for steps, value in by_step.items():
                record = {"env": env, "allocator": variant, "seed": seed, "timesteps": steps}
                f.write(json.dumps({**record, "eval_return_mean": value + 1.0}) + "\n")
    table = study_report(tmp_path, [env], ["uniform", "kkt"], [0, 1])
    kkt = next(line for line in table.splitlines() if "| kkt |" in line)
    assert "| 1 | 5200 ± 0 | +0.0% |" in kkt  # only the seed that reached 1M, at 1M
    early = study_report(tmp_path, [env], ["uniform", "kkt"], [0, 1], at_steps=500_000)
    assert "| 2 | 3550 ± 778 | -13.4% |" in next(line for line in early.splitlines() if "| kkt |" in line)

    # the learning curves: one PNG per task, from the seeds' evaluations
    (path,) = study_curves(tmp_path, [env], ["uniform", "kkt"], [0, 1], out_dir=tmp_path)
    assert path.name == "study_HalfCheetah-2x3.png" and path.stat().st_size > 10_000
