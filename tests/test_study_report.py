"""Issue #8's study report (benchmarks/mamujoco.py): confidence intervals and stuck seeds."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from benchmarks.mamujoco import (
    VARIANTS,
    allocation_effect,
    default_kkt_seeds_from_w,
    difference_cis,
    floor_bindings,
    parse_baselines,
    pooled_difference,
    study_auc,
    study_curves,
    study_report,
    variant_kwargs,
    verdict,
    welch_df,
)
from sb3_hatrpo import HATRPO
from sb3_hatrpo.allocators import kkt_thresholds, make_allocator


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


def _write_evals(root, env, variant, seed, by_step):
    """A run's ``eval.jsonl``: ``{timesteps: deterministic eval return}``."""
    folder = root / env.replace(":", "_") / variant / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "eval.jsonl").write_text(
        "".join(json.dumps({"timesteps": t, "mean": m, "std": 0.0}) + "\n" for t, m in by_step.items())
    )


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
            _write_evals(tmp_path, env, variant, seed, by_step)
            for steps, value in by_step.items():
                record = {"env": env, "allocator": variant, "seed": seed, "timesteps": steps}
                f.write(json.dumps({**record, "eval_return_mean": value + 1.0}) + "\n")
    table = study_report(tmp_path, [env], ["uniform", "kkt"], [0, 1])
    kkt = next(line for line in table.splitlines() if "| kkt |" in line)
    # only the seed that reached 1M, at 1M; one seed has no interval
    assert "| 1 | 5200 ± 0 | +0.0% | n/a | n/a |" in kkt and kkt.endswith("| n/a |")
    early = study_report(tmp_path, [env], ["uniform", "kkt"], [0, 1], at_steps=500_000)
    assert "| 2 | 3550 ± 778 | -13.4% |" in next(line for line in early.splitlines() if "| kkt |" in line)

    # the learning curves: one PNG per task, from the seeds' evaluations
    (path,) = study_curves(tmp_path, [env], ["uniform", "kkt"], [0, 1], out_dir=tmp_path)
    assert path.name == "study_HalfCheetah-2x3.png" and path.stat().st_size > 10_000


def test_verdict_names_the_target_only_when_the_interval_says_so():
    assert verdict(12.0, (2.0, 22.0)) == "beats uniform"
    assert verdict(12.0, (-1.0, 25.0)) == "inconclusive"  # large gain, interval reaches 0
    assert verdict(6.0, (1.0, 11.0)) == "inconclusive"  # significant, but below the +10% target
    assert verdict(-2.4, (-14.0, 9.0)) == "+10% ruled out"
    assert verdict(5.0, (float("nan"), float("nan"))) == "n/a"


def _write_run(root, env, variant, seed, final, thresholds):
    folder = root / env.replace(":", "_") / variant / f"seed{seed}"
    folder.mkdir(parents=True)
    with (folder / "progress.jsonl").open("w") as f:
        for i, iteration in enumerate(thresholds):
            allocation = [{"agent": f"a{j}", "threshold": t, "kl": 0.5 * t} for j, t in enumerate(iteration)]
            f.write(json.dumps({"timesteps": 2000 * (i + 1), "allocation": allocation}) + "\n")
    (folder / "eval.jsonl").write_text(json.dumps({"timesteps": 4000, "mean": final, "std": 0.0}) + "\n")
    with (root / "final.jsonl").open("a") as f:
        record = {"env": env, "allocator": variant, "seed": seed, "timesteps": 4000, "eval_return_mean": final}
        f.write(json.dumps(record) + "\n")


def test_study_report_gives_verdicts_per_task_and_counts_floor_bindings(tmp_path):
    # HalfCheetah 2x3's zoo target_kl is 0.01, so the default floor is 0.005 per agent
    env = "mamujoco:HalfCheetah-2x3"
    for seed, value in enumerate([5000.0, 5100.0, 4900.0]):
        _write_run(tmp_path, env, "uniform", seed, value, [[0.01, 0.01]] * 2)
    nofloor = {0: [[0.012, 0.008], [0.011, 0.009]], 1: [[0.0155, 0.0045], [0.01, 0.01]], 2: [[0.013, 0.007]] * 2}
    for seed, value in enumerate([6000.0, 6100.0, 5900.0]):
        _write_run(tmp_path, env, "kkt-nofloor", seed, value, nofloor[seed])
    table = study_report(tmp_path, [env], ["uniform", "kkt-nofloor"], [0, 1, 2])
    row = next(line for line in table.splitlines() if "| kkt-nofloor |" in line)
    assert "| +20.0% | +15% .. +25% |" in row and row.endswith("| beats uniform |")
    assert "kkt-nofloor: beats uniform on 1 of 1 tasks (1 beats uniform)" in table
    # only seed 1's 0.0045 is below the floor 0.005
    assert floor_bindings(tmp_path, env, "kkt-nofloor", [0, 1, 2]) == (1, 12, [1])
    assert "would have bound in 1 of 12 thresholds (seeds [1])" in table


def test_default_kkt_counts_ws_run_only_where_w_never_met_the_floor_and_it_has_no_run_of_its_own(tmp_path):
    env = "mamujoco:HalfCheetah-2x3"  # floor 0.005 per agent
    for seed in range(4):
        _write_run(tmp_path, env, "uniform", seed, 5000.0 + 10 * seed, [[0.01, 0.01]])
    # seed 0: W never met the floor, no kkt run -> W's run counts (and its KL: 0.03 of 0.02, 150%)
    _write_run(tmp_path, env, "kkt-nofloor", 0, 6000.0, [[0.05, 0.01]])
    # seed 1: W met the floor (0.004) -> the default KKT would have parted from it: not counted
    _write_run(tmp_path, env, "kkt-nofloor", 1, 6100.0, [[0.016, 0.004]])
    # seed 2: a kkt run of its own wins over W's
    _write_run(tmp_path, env, "kkt-nofloor", 2, 5900.0, [[0.01, 0.01]])
    _write_run(tmp_path, env, "kkt", 2, 5200.0, [[0.01, 0.01]])
    _write_run(tmp_path, env, "kkt", 3, 5400.0, [[0.01, 0.01]])
    assert default_kkt_seeds_from_w(tmp_path, env, [0, 1, 2, 3]) == [0]

    def kkt_row(**kwargs):
        table = study_report(tmp_path, [env], ["uniform", "kkt"], [0, 1, 2, 3], **kwargs)
        return next(line for line in table.splitlines() if "| kkt |" in line), table

    row, table = kkt_row(default_kkt_from_w=True)
    # seeds 0 (W's 6000), 2 (its own 5200, not W's 5900) and 3: 5533 ± 416; KL (150% + 50% + 50%) / 3
    assert "| kkt | 3 | 5533 ± 416 |" in row and "| 83% |" in row
    assert "kkt: seeds [0] are kkt-nofloor's runs" in table
    row, table = kkt_row()  # off by default: only its own runs
    assert "| kkt | 2 | 5300 ± 141 |" in row and "| 50% |" in row and "kkt-nofloor's runs" not in table


def test_claims_keep_workers_off_each_others_runs_and_free_a_dead_workers(tmp_path):
    import socket
    import subprocess
    import sys

    from benchmarks.mamujoco import claim_run

    folder = tmp_path / "env" / "uniform" / "seed0"
    assert claim_run(folder)
    assert (folder / "claim").read_text() == f"{socket.gethostname()} {os.getpid()}"
    # a live worker's claim holds
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as live:
        (folder / "claim").write_text(f"{socket.gethostname()} {live.pid}")
        assert not claim_run(folder)
        live.kill()
    # once that worker is gone its run is taken over
    assert claim_run(folder)
    assert (folder / "claim").read_text().endswith(f" {os.getpid()}")
    # another host's claim cannot be checked from here: it is respected
    (folder / "claim").write_text(f"not-{socket.gethostname()} 1")
    assert not claim_run(folder)


def test_allocation_effect_is_the_gain_kkt_predicts_by_its_own_potentials(tmp_path):
    # W's thresholds from known potentials: the predicted gain must be sum c sqrt(2 delta*) over
    # sum c sqrt(2 delta_total / n), read back from the thresholds alone
    rng = np.random.default_rng(0)
    env, iterations, direct = "mamujoco:HalfCheetah-6x1", [], []
    for _ in range(9):
        c = rng.uniform(0.2, 1.0, size=6)
        delta = kkt_thresholds(c, total_kl=0.03)
        iterations.append(delta.tolist())
        direct.append(np.sum(c * np.sqrt(2 * delta)) / np.sum(c * np.sqrt(2 * 0.03 / 6)) - 1)
    _write_run(tmp_path, env, "kkt-nofloor", 0, 4000.0, iterations)
    _, gain, n = allocation_effect(tmp_path, env, "kkt-nofloor", [0])
    assert n == 9 and gain == pytest.approx(np.median(direct), rel=1e-9)
    assert gain > 0
    # equal shares move nothing and gain nothing
    _write_run(tmp_path, env, "uniform", 0, 4000.0, [[0.005] * 6] * 3)
    assert allocation_effect(tmp_path, env, "uniform", [0])[:2] == (0.0, pytest.approx(0.0, abs=1e-12))
    # two agents at 0.012 / 0.008: a tenth of the budget moved
    _write_run(tmp_path, "mamujoco:HalfCheetah-2x3", "kkt-nofloor", 0, 5000.0, [[0.012, 0.008]])
    assert allocation_effect(tmp_path, "mamujoco:HalfCheetah-2x3", "kkt-nofloor", [0])[0] == pytest.approx(0.1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_study_variant_builds_the_model_it_names(variant):
    # A typo in a variant's overrides (an allocator option, a hyperparameter) must fail here, not
    # after a study worker has spent its first run on it.
    env_id = "mamujoco:HalfCheetah-6x1"
    kwargs, n_envs = variant_kwargs(env_id, variant)
    model = HATRPO("MlpPolicy", env_id, n_envs=n_envs, **kwargs)
    try:
        expected = make_allocator(VARIANTS[variant][0]).__class__
        assert type(model.allocator) is expected
        for option, value in kwargs.get("allocator_kwargs", {}).items():
            assert getattr(model.allocator, option) == value, option
        for name, value in VARIANTS[variant][1].items():
            if name not in ("allocator_kwargs", "policy_kwargs"):
                assert getattr(model, name) == value, name
    finally:
        model.env.close()


def test_auc_metric_averages_every_evaluation_and_keeps_stuck_on_the_final_one(tmp_path):
    env = "mamujoco:HalfCheetah-2x3"
    evals = {
        ("uniform", 0): {100: 1000.0, 200: 2000.0, 300: 3000.0},
        ("uniform", 1): {100: 1200.0, 200: 2200.0, 300: 3200.0},
        # learns late: a lower AUC, the same final return as uniform's seed 0
        ("kkt", 0): {100: 0.0, 200: 600.0, 300: 3000.0},
        # ends low (stuck by its final evaluation) after a fast start
        ("kkt", 1): {100: 2000.0, 200: 2000.0, 300: 1000.0},
        ("kkt", 2): {100: 900.0, 300: 3100.0},  # an evaluation missing: not in the AUC cell
    }
    for (variant, seed), by_step in evals.items():
        _write_evals(tmp_path, env, variant, seed, by_step)
    assert study_auc(tmp_path, env, "kkt", [0, 1, 2], upto=300, every=100) == {0: 1200.0, 1: 5000.0 / 3}
    assert study_auc(tmp_path, env, "kkt", [0, 1, 2], upto=200, every=100) == {0: 300.0, 1: 2000.0}

    table = study_report(tmp_path, [env], ["uniform", "kkt"], [0, 1, 2], at_steps=300, metric="auc", eval_every=100)
    assert "AUC: mean eval return every 100 steps" in table.splitlines()[0]
    uniform = next(line for line in table.splitlines() if "| uniform |" in line)
    kkt = next(line for line in table.splitlines() if "| kkt |" in line)
    assert "| 2 | 2100 ± 141 |" in uniform
    # (1200 + 1666.7) / 2 = 1433 against 2100: -31.7%; seed 1's final 1000 < half of uniform's median final 3100
    assert "| 2 | 1433 ± 330 | -31.7% |" in kkt and "| 1/2 |" in kkt
    final = study_report(tmp_path, [env], ["uniform", "kkt"], [0, 1, 2], at_steps=300)
    assert "| 3 | 2367 ± 1185 |" in next(line for line in final.splitlines() if "| kkt |" in line)
    with pytest.raises(ValueError, match="metric"):
        study_report(tmp_path, [env], ["uniform", "kkt"], [0], metric="median")


def test_pooled_difference_weights_tasks_by_their_precision():
    mean, low, high, p_q = pooled_difference([10.0, -2.0], [5.0, 5.0])
    assert mean == pytest.approx(4.0) and (low, high) == pytest.approx(
        (4.0 - 1.96 * 5 / np.sqrt(2), 4.0 + 6.93), abs=0.01
    )
    assert p_q == pytest.approx(stats.chi2.sf(2.88, 1))  # Q = (6^2 + 6^2) / 25
    # a precise task dominates a noisy one
    mean, _, _, _ = pooled_difference([10.0, -2.0], [1.0, 10.0])
    assert mean == pytest.approx((10.0 - 2.0 / 100) / (1 + 1 / 100))
    assert all(np.isnan(x) for x in pooled_difference([3.0], [1.0]))


def test_pooled_difference_uses_the_t_quantile_on_the_satterthwaite_degrees_of_freedom():
    # two equally precise tasks, each on 9 Welch degrees of freedom: nu = (2/25)^2 / (2 (1/25)^2 / 9) = 18
    mean, low, high, _ = pooled_difference([10.0, -2.0], [5.0, 5.0], dfs=[9.0, 9.0])
    half = stats.t.ppf(0.975, 18) * 5 / np.sqrt(2)
    assert mean == pytest.approx(4.0) and (low, high) == pytest.approx((4.0 - half, 4.0 + half))
    # a task measured on 1 degree of freedom widens the interval far more than one on 1000
    _, low_1, high_1, _ = pooled_difference([10.0, -2.0], [5.0, 5.0], dfs=[1.0, 9.0])
    _, low_big, high_big, _ = pooled_difference([10.0, -2.0], [5.0, 5.0], dfs=[1000.0, 1000.0])
    assert high_1 - low_1 > high - low > high_big - low_big
    assert high_big - low_big == pytest.approx(2 * 1.96 * 5 / np.sqrt(2), rel=2e-3)


def test_welch_df_is_n_minus_one_a_side_for_equal_spreads_and_sizes():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]
    assert welch_df(a, b) == pytest.approx(6.0)  # 2 (n - 1) for equal variances and sizes
    assert welch_df([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]) == pytest.approx(3.0)  # all from one side
    assert welch_df([1.0, 1.0], [2.0, 2.0]) == 1.0


def test_study_report_takes_a_baseline_per_task_and_pools_the_tasks(tmp_path):
    finals = {
        ("mamujoco:HalfCheetah-2x3", "uniform-half-batch"): [2000.0, 2200.0, 2400.0],
        ("mamujoco:HalfCheetah-2x3", "kkt"): [2100.0, 2300.0, 2500.0],
        ("mamujoco:HalfCheetah-6x1", "uniform"): [1000.0, 1100.0, 1200.0],
        ("mamujoco:HalfCheetah-6x1", "kkt"): [1000.0, 1100.0, 1200.0],
    }
    with (tmp_path / "final.jsonl").open("w") as f:
        for (env, variant), returns in finals.items():
            for seed, value in enumerate(returns):
                record = {"env": env, "allocator": variant, "seed": seed, "eval_return_mean": value}
                f.write(json.dumps(record) + "\n")
    envs = ["mamujoco:HalfCheetah-2x3", "mamujoco:HalfCheetah-6x1"]
    table = study_report(
        tmp_path,
        envs,
        ["uniform", "uniform-half-batch", "kkt"],
        [0, 1, 2],
        baselines={"mamujoco:HalfCheetah-2x3": "uniform-half-batch"},
    )
    rows = [line for line in table.splitlines() if line.startswith("| mamujoco")]
    assert [row.split(" | ")[1] for row in rows] == ["uniform-half-batch", "kkt", "uniform", "kkt"]
    assert "| +4.5% |" in rows[1] and "| +0.0% |" in rows[3]
    # both tasks' differences have the same standard error in %: 200 / sqrt(3) / 2200 and 100 / sqrt(3) / 1100
    assert "kkt: beats uniform on 0 of 2 tasks" in table
    # each task's Welch df is 4, so the pooled interval takes t on 8 df: 2.27 +- 2.306 * 7.42 / sqrt(2)
    assert "pooled over 2 tasks (fixed effect): +2.3% (95% CI -9.8% .. +14.4%" in table
    assert not any(line.startswith("uniform") for line in table.splitlines())  # baselines get no verdict line
    assert parse_baselines(["uniform", "mamujoco:HalfCheetah-2x3=uniform-half-batch"]) == (
        "uniform",
        {"mamujoco:HalfCheetah-2x3": "uniform-half-batch"},
    )
    with pytest.raises(SystemExit, match="unknown variant"):
        parse_baselines(["mamujoco:HalfCheetah-2x3=uniform-typo"])
