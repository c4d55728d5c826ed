"""The front's table and plots: staircase direction, no misleading lines, offline HTML."""

from __future__ import annotations

from paretoray.orchestrator import pareto


def row(trial: int, latency: float, accuracy: float, kv: float, front: bool, technique: str = "snapkv") -> dict:
    metrics = {"latency_ms_per_token": latency, "accuracy": accuracy, "kv_cache_mb": kv}
    return {"trial": trial, "state": "complete", "technique": technique, "label": f"{technique}#{trial}", "params": {"b": trial},
            "metrics": metrics, "objectives": metrics, "feasible": True, "pareto": front, "mlflow_run_id": f"run{trial}", "error": None}


ROWS = [row(0, 40.0, 0.0, 1.0, True), row(1, 50.0, 0.5, 2.0, True, "streaming_llm"), row(2, 60.0, 1.0, 4.0, True), row(3, 70.0, 0.5, 4.0, False)]


def test_staircase_turns_with_the_direction_of_x():
    xs, ys, where = pareto._front_line(ROWS, ["latency_ms_per_token", "accuracy"], ["minimize", "maximize"])
    assert (xs, ys, where) == ([40.0, 50.0, 60.0], [0.0, 0.5, 1.0], "post")  # x minimized: across, then up
    assert pareto._front_line(ROWS, ["accuracy", "latency_ms_per_token"], ["maximize", "minimize"])[2] == "pre"  # x maximized: up, then across
    # the study's direction decides, also for a metric the registry knows only by its base name
    per_length = [r | {"metrics": {"accuracy/ctx1024": r["metrics"]["accuracy"], "latency_ms_per_token": r["metrics"]["latency_ms_per_token"]}}
                  for r in ROWS]
    assert pareto._front_line(per_length, ["accuracy/ctx1024", "latency_ms_per_token"], ["maximize", "minimize"])[2] == "pre"
    assert pareto._front_line(ROWS, ["accuracy", "latency_ms_per_token", "kv_cache_mb"], ["maximize", "minimize", "minimize"]) is None


def test_front_frame_and_plots(tmp_path):
    objectives = ["latency_ms_per_token", "accuracy"]
    frame = pareto.front_frame(ROWS, objectives, pareto_only=True)
    assert frame["trial"].to_list() == [0, 1, 2]
    assert frame.columns[:6] == ["trial", "state", "technique", "label", "latency_ms_per_token", "accuracy"]
    png = pareto.plot_png(ROWS, objectives, ["minimize", "maximize"], "t", tmp_path / "f.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
