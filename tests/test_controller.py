"""The controller's Optuna side, without Ray: conditional spaces, samplers, repeated configurations."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from paretoray.orchestrator.book import SweepBook, configurations, make_sampler
from paretoray.orchestrator.spec import grid_size, parse, search_space
from paretoray.orchestrator.stores import resolve_stores


def spec(sampler: str = "random", window=(8, 16)):
    return parse(
        {
            "name": "c",
            "model": "smollm2-135m",
            "workload": {"context_lengths": [256]},
            "techniques": {"dense": {}, "streaming_llm": {"n_sink": [0, 4], "window": list(window)}},
            "objectives": {"latency_ms_per_token": "minimize", "accuracy": "maximize"},
            "sampler": {"name": sampler, "seed": 0},
            "trials": 5,
        },
        "<test>",
    )


@pytest.mark.parametrize("name", ["nsga2", "tpe", "gp", "random", "grid"])
def test_every_sampler_builds_and_suggests_a_conditional_space(name):
    s = spec(name)
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=make_sampler(s))
    controller_space = search_space(s)
    from paretoray.orchestrator.book import suggest

    for _ in range(4):
        trial = study.ask()
        technique, params = suggest(trial, controller_space)
        if technique == "dense":
            assert params == {} and set(trial.params) == {"technique"}
        else:
            assert set(params) == {"n_sink", "window"}
        study.tell(trial, [1.0, 0.5])


def test_grid_size_counts_the_conditional_tree():
    assert grid_size(search_space(spec("grid"))) == 1 + 2 * 2


def in_memory_book(tmp_path) -> SweepBook:
    """A book whose study lives in memory (ask and its repeat bookkeeping need no store)."""
    book = SweepBook(spec("random"), resolve_stores(home=str(tmp_path)))
    book.study = optuna.create_study(directions=["minimize", "maximize"], sampler=make_sampler(book.spec))
    book.parent, book.recorder = "parent", NoRuns()
    return book


class NoRuns:
    """A recorder with no trial runs: what MLflow holds for trials that never reached an actor."""

    def find_trial_run(self, parent, number):
        return None


def test_repeated_configurations_are_not_measured_twice(tmp_path):
    book = in_memory_book(tmp_path)
    study = book.study
    measured = []
    for _ in range(5):  # exactly the size of the grid: every configuration once
        trial = book.ask().trial
        measured.append(json.dumps(trial.params, sort_keys=True))
        study.tell(trial, [1.0, 0.5])
    assert len(set(measured)) == 5
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert all(t.user_attrs["repeat_of_measured_config"] for t in pruned)
    # The space is exhausted now: after the bound, a repeat is run rather than looping forever.
    trial = book.ask(max_repeats=3).trial
    assert json.dumps(trial.params, sort_keys=True) in measured


def test_a_failed_forced_repeat_does_not_forget_the_trial_that_measured_it(tmp_path):
    book = in_memory_book(tmp_path)
    for _ in range(5):  # the whole grid, measured
        book.study.tell(book.ask().trial, [1.0, 0.5])
    book._seen = configurations(book.study)
    trial = book.ask(max_repeats=3).trial  # exhausted: a measured configuration again
    key = json.dumps(trial.params, sort_keys=True)
    book._seen[key] -= 1  # what `finish` does when that repeat fails
    assert book._seen[key] == 1  # still measured by its first trial: not proposed as new


def test_a_repeat_left_running_by_a_dead_controller_is_pruned_not_re_asked(tmp_path):
    """A controller killed between marking a repeat and pruning it leaves it RUNNING: the next one
    finishes setting it aside (PRUNED) and queues nothing, since that configuration was measured."""
    book = in_memory_book(tmp_path)
    book.study.tell(book.ask().trial, [1.0, 0.5])
    trial = book.study.ask({"technique": optuna.distributions.CategoricalDistribution(["dense", "streaming_llm"])})
    trial.set_user_attr("repeat_of_measured_config", True)  # as `_ask` does, then the controller dies
    book.reconcile()
    states = [t.state for t in book.study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]  # nothing re-queued (no WAITING trial)


def test_a_trial_asked_but_never_suggested_is_pruned_not_re_asked_with_no_parameters(tmp_path):
    """Killed between `ask` and `suggest`: the trial has no parameters; re-queuing {} would only
    be proposed afresh, so it is set aside (PRUNED) and nothing is queued."""
    book = in_memory_book(tmp_path)
    book.study.tell(book.ask().trial, [1.0, 0.5])
    book.study.ask()  # the controller dies here
    book.reconcile()
    assert [t.state for t in book.study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
