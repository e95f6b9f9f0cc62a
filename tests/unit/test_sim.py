"""The fleet simulator: traces, the fluid model, the policies' clocks, output and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ttsfleet.api.v1alpha1 import TtsDeploymentSpec
from ttsfleet.autoscale.loop import policy_for
from ttsfleet.cli import app
from ttsfleet.sim import compare, engine, policies, report, traces, validate
from ttsfleet.sim.engine import SimConfig, View, count_oscillations, simulate, steps
from ttsfleet.sim.service import MEASURED_TTFA_P50_S, calibrated

REPO = Path(__file__).resolve().parents[2]
SERVICE = calibrated(samples=4000)
STEP = traces.Trace("step", ((0.0, 100.0), (300.0, 100.0), (301.0, 800.0), (1500.0, 800.0)))
UP_DOWN = traces.Trace(
    "up-down", ((0.0, 100.0), (300.0, 100.0), (301.0, 800.0), (900.0, 800.0), (901.0, 100.0),
                (2400.0, 100.0))
)  # fmt: skip


def test_builtin_traces_have_their_shapes() -> None:
    spike = traces.load("spike")
    before, after = spike.rate(899.0), spike.rate(930.0)
    assert after >= 10 * before * 0.999  # x10 ...
    assert spike.rate(900.0) == before and after == spike.peak  # ... within 30 s
    assert traces.load("diurnal").duration_s == 24 * 3600
    crowd = traces.load("flash-crowd")
    assert crowd.rate(610.0) > 10 * crowd.rate(0.0) > crowd.rate(3600.0) * 0.9
    ramp = traces.load("ramp")
    assert ramp.rate(0.0) < ramp.rate(1800.0) < ramp.rate(3600.0) == ramp.peak
    assert traces.load("diurnal").sampled(60.0) == traces.load("diurnal").sampled(60.0)


def test_noisy_variants_keep_their_base_and_add_jitter_bursts_and_an_outage() -> None:
    base, noisy = traces.load("spike"), traces.load("spike-noisy")
    assert noisy.name == "spike-noisy" and noisy == traces.load("spike-noisy")  # seeded
    assert traces.KINDS["spike-noisy"] == "step" and traces.KINDS["ramp-noisy"] == "slow"
    rates = noisy.sampled(1.0)
    plain = base.sampled(1.0)
    assert len(rates) == len(plain)
    # The same traffic on the whole (jitter has mean 1; bursts add a few percent; the
    # retry surge gives back what the outage held).
    assert 1.0 <= sum(rates) / sum(plain) < 1.15
    # Jitter: neighbouring seconds differ where the base is flat.
    assert len({round(r) for r in rates[:300]}) > 100
    # The outage: a minute at 5 % of the rate, then the surge on top of it.
    low = [i for i, (r, b) in enumerate(zip(rates, plain, strict=True)) if r < 0.1 * b]
    assert 55 <= len(low) <= 65 and low[-1] - low[0] == len(low) - 1
    surge = rates[low[-1] + 1 : low[-1] + 31]
    assert sum(surge) > 2 * sum(plain[low[-1] + 1 : low[-1] + 31])


def test_csv_traces_are_interpolated(tmp_path: Path) -> None:
    path = tmp_path / "load.csv"
    path.write_text("t_s,requests_per_s\n0,10\n10,30\n60,30\n")
    trace = traces.load(str(path))
    assert trace.rate(5.0) == 20.0 and trace.rate(30.0) == 30.0 and trace.duration_s == 60.0
    assert trace.sampled(10.0)[:2] == [20.0, 30.0]  # the middle of each tick


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("time,rps\n0,1\n1,2\n", "the header must be `t_s,requests_per_s`"),
        ("t_s,requests_per_s\n0,1\n0,2\n", "line 3: t_s must increase"),
        ("t_s,requests_per_s\n0,1\n1,x\n", "line 3: not numbers"),
        ("t_s,requests_per_s\n0,1\n1,-2\n", "line 3: requests_per_s must be finite and >= 0"),
        ("t_s,requests_per_s\n0,1\n", "needs at least 2 rows"),
    ],
)
def test_csv_errors_name_the_problem(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(traces.TraceError, match=says):
        traces.load(str(path))


def test_unknown_trace_names_the_choices() -> None:
    with pytest.raises(traces.TraceError, match="diurnal, spike, flash-crowd, ramp"):
        traces.load("tsunami")


def test_service_model_reproduces_the_benchmark() -> None:
    assert SERVICE.replica_rate == pytest.approx(9.66, rel=1e-6)
    for concurrency, measured in MEASURED_TTFA_P50_S.items():
        assert SERVICE.closed_loop_ttfa_p50(concurrency) == pytest.approx(measured, rel=0.1)
    assert SERVICE.within(0.3, 0.2) > SERVICE.within(0.3, 0.6)  # busier is slower
    assert SERVICE.within(0.3, 0.2, delay=1.0) == 0.0  # a backlog delay shows


def test_the_fluid_model_conserves_requests() -> None:
    result = simulate(STEP, policies.Static(5), SimConfig(initial_replicas=5), SERVICE)
    assert result.requests == pytest.approx(sum(STEP.sampled(1.0)))
    assert result.served + result.backlog == pytest.approx(result.requests)
    assert result.backlog > 0  # 5 replicas cannot carry 800 req/s: it queues, nothing is lost
    assert result.slo_attainment < 0.5


def test_ttsfleet_scales_up_on_a_step_and_down_after_the_delay() -> None:
    result = simulate(UP_DOWN, policies.TtsfleetScaler(), None, SERVICE)
    ups = [t for t, a, b in result.scale_events if b > a]
    downs = [t for t, a, b in result.scale_events if b < a]
    assert ups and 300 < ups[0] <= 320  # within seconds of the step
    assert max(result.series.replicas) >= 800 / SERVICE.replica_rate
    # After the drop at 900 s, the fleet keeps what 800 req/s needed for the 120 s delay...
    need = SERVICE.need(800, 0.3)
    held = [n for t, n in zip(result.series.t_s, result.series.replicas, strict=True)
            if 900 < t < 1015]  # fmt: skip
    assert min(held) >= 0.9 * need
    # ... then goes down.
    assert any(1020 <= t < 1100 for t in downs)
    assert result.series.replicas[-1] < 30 and result.oscillations == 0


def test_reaction_time_counts_from_the_step_onset() -> None:
    spike = traces.load("spike")
    assert steps(spike.sampled(1.0), SimConfig()) == [899]
    assert steps(traces.load("ramp").sampled(1.0), SimConfig()) == []
    reacted = simulate(spike, policies.TtsfleetScaler(), None, SERVICE)
    assert reacted.reaction_s_p95 is not None and 30 < reacted.reaction_s_p95 < 90


def test_a_smooth_rise_is_a_step_from_where_it_starts_rising() -> None:
    flat, rise = [100.0] * 100, [100 * 1.0079**i for i in range(61)]  # 1.6x in 60 s
    assert steps(rise + [rise[-1]] * 60, SimConfig()) == [0]  # not the end of the trace
    assert steps(flat + rise + [160.0] * 30 + [400.0] * 60, SimConfig()) == [100, 190]


def test_hpa_waits_out_its_300s_stabilisation_before_scaling_down() -> None:
    result = simulate(UP_DOWN, policies.baseline("hpa", 0.5), None, SERVICE)
    assert all(t % 15 == 0 for t, _, _ in result.scale_events)  # 15 s sync period
    downs = [t for t, a, b in result.scale_events if b < a and t > 900]
    assert downs and min(downs) >= 900 + 300


def test_keda_reads_at_each_15s_sync_unless_it_caches_and_kpa_ticks_every_2s() -> None:
    keda = simulate(UP_DOWN, policies.baseline("keda", 0.5), None, SERVICE)
    assert any(t % 30 for t, _, _ in keda.scale_events)  # not only on a 30 s poll
    assert keda.scale_events and all(t % 15 == 0 for t, _, _ in keda.scale_events)
    cached = simulate(UP_DOWN, policies.Keda(0.5, cached_metrics=True), None, SERVICE)
    assert cached.scale_events and all(t % 30 == 0 for t, _, _ in cached.scale_events)
    # Fresh reads answer a step sooner: the first scale-up after it comes earlier.
    assert min(t for t, a, b in keda.scale_events if b > a and t > 300) < min(
        t for t, a, b in cached.scale_events if b > a and t > 300
    )
    kpa = simulate(UP_DOWN, policies.baseline("kpa", 0.5), None, SERVICE)
    first_up = min(t for t, a, b in kpa.scale_events if b > a and t > 300)
    assert 300 < first_up <= 310 and all(t % 2 == 0 for t, _, _ in kpa.scale_events)


def test_prometheus_view_lags_by_the_scrape_interval() -> None:
    view = View(SimConfig(scrape_interval_s=5.0), SERVICE)
    view.pending = [float(i) for i in range(20)]
    assert view.pending_requests(12.0) == 9.0  # the scrape at 10 s saw the end of tick 9
    assert view.queue_seconds(3.0) is None  # one scrape in the window: no rate yet


def test_oscillations_are_flaps_not_corrections() -> None:
    assert count_oscillations([(0, 1, 4), (200, 4, 3)], 600) == 0  # overshoot, corrected
    assert count_oscillations([(0, 1, 4), (200, 4, 3), (400, 3, 5)], 600) == 1
    assert count_oscillations([(0, 1, 4), (200, 4, 3), (900, 3, 5)], 600) == 0


def test_json_output_shape() -> None:
    short = traces.Trace("short", ((0.0, 50.0), (120.0, 50.0), (121.0, 200.0), (600.0, 200.0)))
    result = compare.compare(short, ["ttsfleet", "hpa", "static-peak"], None, SERVICE)
    doc = report.as_json(result)
    assert set(doc["policies"]) == {"ttsfleet", "hpa", "static-peak"}
    for summary in doc["policies"].values():
        assert {"slo_attainment", "slo_misses", "replica_hours", "oscillations_per_hour",
                "reaction_s_p95"} <= set(summary)  # fmt: skip
    swept = [p["target"] for p in doc["sweeps"]["hpa"]]
    assert set(policies.SWEEPS["hpa"]) <= set(swept) and swept == sorted(swept)
    goals = report.goals(result)
    json.dumps(doc | {"goals": goals})
    # The goals retired with the second pass are gone; never-dominated replaces them.
    assert not {"fewer_misses_3x", "fewer_replica_hours_45pct"} & set(goals)
    assert {"never_dominated", "dominated_by", "no_more_than_static_peak"} <= set(goals)


def test_the_oracle_sees_the_highest_load_of_its_whole_lead() -> None:
    """A burst between the points the old oracle looked at (now, lead / 2, lead): it
    must be ready for it when the burst comes, not miss it."""
    rates = [100.0] * 120
    rates[70:74] = [900.0] * 4  # 4 s at 9x, 10-14 s after t = 60 s
    oracle = policies.oracle(0.5, rates, 1.0, 10.0, lead_s=32.0)
    view = View(SimConfig(), SERVICE)
    assert oracle.decide(view, 40.0, 20, 20) == 180  # 900 / 10 / 0.5, 30 s ahead
    assert oracle.decide(view, 60.0, 20, 20) == 180  # t + 16 and t + 32 are both at 100
    assert oracle.decide(view, 80.0, 180, 180) == 20
    assert policies.window_max([1.0, 5.0, 2.0, 0.0, 3.0], 2) == [5.0, 5.0, 3.0, 3.0, 3.0]


def test_the_oracle_joins_the_policies_and_bounds_them_on_a_step() -> None:
    result = compare.compare(STEP, ["ttsfleet", "oracle"], None, SERVICE)
    assert "oracle" in result.results
    sweep = result.sweeps["oracle"]
    own = result.results["ttsfleet"]
    hours = [x.result.replica_hours for x in sweep]
    assert max(hours) >= 2 * own.replica_hours
    # cheaper down to half, or to the highest utilisation it may run at
    cheapest = min(sweep, key=lambda x: x.result.replica_hours)
    limit = policies.TARGET_LIMITS["oracle"]
    assert min(hours) <= 0.5 * own.replica_hours or cheapest.target == limit
    assert len(sweep) >= 8
    at = report.misses_at(sweep, own.replica_hours)
    assert at is not None and at <= own.slo_misses  # nothing beats foresight at equal cost
    goals = report.goals(result, "step")
    assert goals["oracle_misses_at_equal_replica_hours"] == round(at)


def test_max_replicas_defaults_to_four_times_the_peak_need() -> None:
    config = engine.bounded(SimConfig(), STEP, SERVICE)
    need = engine.peak_need(STEP, config, SERVICE)
    assert config.max_replicas == 4 * need
    assert engine.bounded(SimConfig(max_replicas=7), STEP, SERVICE).max_replicas == 7
    # A policy that asks for the moon gets 4x the need, not 1,000 or less.
    greedy = policies.Static(10**6)
    result = simulate(STEP, greedy, None, SERVICE)
    assert max(result.series.replicas) == 4 * need


def test_validation_replays_a_recorded_run(tmp_path: Path) -> None:
    samples = [
        {"t_s": float(t), "requests_per_s": 5.0 if t < 30 else 30.0, "replicas": 1,
         "ready_replicas": 1, "ttfa_p95_s": 0.1 if t else None}
        for t in range(90)
    ]  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"policy": {"max_replicas": 4, "tick_seconds": 2},
                                "samples": samples}))  # fmt: skip
    record = validate.load_record(path)
    assert record.loop_period_s == 2 and record.config.cold_start_s == SimConfig().cold_start_s
    checked = validate.validate(record, SERVICE)
    assert checked["samples"] == 90 and len(checked["rows"]) == 90
    assert max(r["sim_replicas"] for r in checked["rows"]) > 1  # it scaled on the rise
    assert checked["error"]["replicas_mean_abs"] > 0
    steps_up = [dict(x) for x in samples[:6]]
    for x, (replicas, ready) in zip(steps_up, [(1, 1), (2, 1), (2, 1), (2, 2), (2, 2), (2, 2)],
                                    strict=True):  # fmt: skip
        x["replicas"], x["ready_replicas"] = replicas, ready
    assert validate.cold_start(tuple(steps_up)) == 2.0  # asked at 1 s, Ready at 3 s
    path.write_text(json.dumps({"samples": [{"t_s": 0}]}))
    with pytest.raises(validate.RecordError, match="at least 2"):
        validate.load_record(path)


runner = CliRunner()


def test_cli_rejects_unknown_trace_and_policy() -> None:
    bad_trace = runner.invoke(app, ["sim", "--trace", "tsunami"])
    assert bad_trace.exit_code == 1
    assert "diurnal, spike, flash-crowd, ramp" in bad_trace.output
    bad_policy = runner.invoke(app, ["sim", "--trace", "spike", "--policy", "vpa"])
    assert bad_policy.exit_code == 1
    assert "ttsfleet, hpa, hpa-queue, keda, kpa, oracle, static-peak" in bad_policy.output
    assert runner.invoke(app, ["sim"]).exit_code == 1


def test_cli_prints_json_for_a_csv_trace(tmp_path: Path) -> None:
    path = tmp_path / "load.csv"
    path.write_text("t_s,requests_per_s\n0,20\n120,20\n125,100\n400,100\n")
    out = runner.invoke(app, ["sim", "--trace", str(path), "--policy", "ttsfleet", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert set(doc["policies"]) == {"ttsfleet"} and doc["trace"] == "load"


def test_the_simulated_ttsfleet_policy_is_what_the_operator_builds_from_defaults() -> None:
    spec = TtsDeploymentSpec.model_validate({"minReplicas": 1, "maxReplicas": 1000})
    assert policy_for(spec) == policies.ttsfleet_policy(max_replicas=1000)


def test_the_peers_as_users_deploy_them_are_reported_on_a_step() -> None:
    result = compare.compare(STEP, ["ttsfleet", "hpa-queue", "keda", "kpa"], None, SERVICE)
    goals = report.goals(result, "step")
    deployed = goals["as_deployed"]
    assert {name: d["target"] for name, d in deployed.items()} == policies.AS_DEPLOYED
    kpa = next(x.result for x in result.sweeps["kpa"] if x.target == 0.7)
    assert deployed["kpa"]["slo_misses"] == round(kpa.slo_misses)
    own = result.results["ttsfleet"]
    assert goals["no_worse_than_kpa_as_deployed"] == (
        own.slo_misses <= kpa.slo_misses and own.oscillations == 0
    )
    assert isinstance(goals["beats_hpa_and_keda_as_deployed"], bool)
    assert "as_deployed" not in report.goals(
        compare.compare(STEP, ["ttsfleet"], None, SERVICE), "step"
    )


def test_cli_json_has_a_builtin_traces_goals_of_its_kind() -> None:
    out = runner.invoke(
        app, ["sim", "--trace", "ramp", "--policy", "ttsfleet", "--policy", "oracle", "--json"]
    )
    assert out.exit_code == 0, out.output
    goals = json.loads(out.output)["goals"]
    assert "within_3pct_of_oracle" in goals and "misses_over_oracle" in goals


def test_recorded_arrivals_become_a_trace_that_keeps_their_gaps(tmp_path: Path) -> None:
    """hack/arrivals_trace.py: a request a row with its time -> the rate of each bucket
    times the scale, empty buckets kept (the gaps of production traffic), readable by
    `ttsfleet sim`; a missing time column is named."""
    arrivals = tmp_path / "arrivals.csv"
    times = ["2023-11-16 18:15:46.6805900", "2023-11-16 18:15:46.9", "2023-11-16 18:15:47.2",
             "2023-11-16 18:15:50.1"]  # fmt: skip
    arrivals.write_text("TIMESTAMP,Tokens\n" + "".join(f"{t},7\n" for t in times))
    script = [sys.executable, str(REPO / "hack" / "arrivals_trace.py"), str(arrivals)]
    out = subprocess.run([*script, "--scale", "10"], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "t_s,requests_per_s", "0,30", "1,0", "2,0", "3,10",
    ]  # fmt: skip
    (tmp_path / "trace.csv").write_text(out.stdout)
    trace = traces.load(str(tmp_path / "trace.csv"))
    assert trace.duration_s == 3.0 and trace.peak == 30.0
    coarse = subprocess.run([*script, "--bucket", "2"], capture_output=True, text=True, check=True)
    assert coarse.stdout.splitlines()[1:] == ["0,1.5", "2,0.5"]
    wrong = subprocess.run(
        [*script, "--column", "time"], check=False, capture_output=True, text=True
    )
    assert wrong.returncode != 0 and "no column 'time'" in wrong.stderr
