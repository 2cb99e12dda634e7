"""CALVIN's symbolic protocol: task semantics, the 192 start states, chain generation, metrics."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

from dreamrt.errors import UserError
from dreamrt.sim import protocol as P
from dreamrt.sim.state import BLOCK_COLORS, SymbolicState
from dreamrt.sim.tasks import TASKS, category_of, task_names


def sym(slider="right", drawer="closed", led=0, lightbulb=0, **blocks) -> SymbolicState:
    where = {"red": "table", "blue": "table", "pink": "slider_left"} | blocks
    return SymbolicState(led=led, lightbulb=lightbulb, slider=slider, drawer=drawer, blocks=where)


def assert_consistent(state: SymbolicState) -> None:
    """Invariants every state a chain passes through must keep."""
    where = list(state.blocks.values())
    assert where.count("grasped") <= 1 and where.count("stacked") <= 1
    assert where.count("slider_left") <= 1 and where.count("slider_right") <= 1
    if "stacked" in where:
        assert where.count("table") == 1  # the base is unambiguous


@pytest.fixture(scope="module")
def chains() -> list[P.Chain]:
    return P.generate_chains(1000, seed=0)


# --- start states -------------------------------------------------------------------------


def test_192_start_states_in_a_fixed_order():
    states = P.start_states()
    assert len(states) == 192 == P.NUM_START_STATES
    assert states == P.start_states()
    keys = {json.dumps(P.state_to_dict(s), sort_keys=True) for s in states}
    assert len(keys) == 192
    assert states[0] == SymbolicState(
        0, 0, "left", "closed", {"red": "table", "blue": "table", "pink": "slider_left"}
    )


def test_start_state_invariants():
    states = P.start_states()
    for s in states:
        where = [s.blocks[c] for c in BLOCK_COLORS]
        assert set(where) <= {"table", "slider_left", "slider_right"}
        assert where.count("table") in (1, 2)
        assert where.count("slider_left") <= 1 and where.count("slider_right") <= 1
        assert s.led in (0, 1) and s.lightbulb in (0, 1)
    # Every combination of the four switches appears equally often (16 x 12 block layouts).
    combos = Counter((s.led, s.lightbulb, s.slider, s.drawer) for s in states)
    assert len(combos) == 16 and set(combos.values()) == {12}
    assert Counter(tuple(s.blocks.values()).count("table") for s in states) == {1: 6 * 16, 2: 6 * 16}


# --- task semantics -----------------------------------------------------------------------


def test_every_task_has_a_rule():
    assert list(P.RULES) == task_names()


def test_slider_blocks_are_reachable_only_on_the_uncovered_side():
    # Slider right uncovers the left compartment.
    s = sym(slider="right", pink="slider_left")
    assert P.precondition_holds("lift_pink_block_slider", s)
    assert not P.precondition_holds("lift_pink_block_slider", dataclasses.replace(s, slider="left"))
    assert P.apply_task("lift_pink_block_slider", s).blocks["pink"] == "grasped"
    s = sym(slider="left", pink="slider_right")
    assert P.precondition_holds("lift_pink_block_slider", s)
    assert not P.precondition_holds("lift_red_block_slider", s)  # red is on the table


def test_lift_then_place_or_stack():
    s = sym(red="table", blue="slider_right", pink="slider_left", slider="left", drawer="open")
    lifted = P.apply_task("lift_red_block_table", s)
    assert P.grasped_block(lifted) == "red"
    # Hand full: only releasing tasks remain possible.
    assert set(P.valid_tasks(lifted)) == {"place_in_drawer"}  # right compartment taken, no table block
    assert P.apply_task("place_in_drawer", lifted).blocks["red"] == "drawer"
    s = sym(red="table", blue="table", pink="slider_left", slider="left")
    lifted = P.apply_task("lift_red_block_table", s)
    assert set(P.valid_tasks(lifted)) == {"place_in_slider", "stack_block"}
    placed = P.apply_task("place_in_slider", lifted)
    assert placed.blocks["red"] == "slider_right" and P.grasped_block(placed) is None


def test_place_in_slider_needs_the_uncovered_compartment_empty():
    s = sym(red="grasped", blue="table", pink="slider_left", slider="right")
    assert not P.precondition_holds("place_in_slider", s)
    assert P.precondition_holds("place_in_slider", dataclasses.replace(s, slider="left"))


def test_stack_and_unstack():
    s = sym(red="grasped", blue="table", pink="slider_left")
    stacked = P.apply_task("stack_block", s)
    assert stacked.blocks["red"] == "stacked" and P.stack_base(stacked) == "blue"
    # The base is covered: it cannot be rotated, pushed, lifted or pushed into the drawer.
    covered = {f"{verb}_blue_block_{d}" for verb in ("rotate", "push") for d in ("left", "right")}
    covered |= {"lift_blue_block_table", "push_into_drawer", "stack_block"}
    assert not covered & set(P.valid_tasks(dataclasses.replace(stacked, drawer="open")))
    assert P.precondition_holds("unstack_block", stacked)
    unstacked = P.apply_task("unstack_block", stacked)
    assert unstacked.blocks["red"] == "table" and P.stack_base(unstacked) is None
    # Two candidate bases would make the stack ambiguous.
    assert not P.precondition_holds("stack_block", sym(red="grasped", blue="table", pink="table"))


def test_push_into_drawer_needs_one_block_on_the_table_and_an_open_drawer():
    s = sym(red="table", blue="slider_right", pink="slider_left", drawer="open")
    assert P.apply_task("push_into_drawer", s).blocks["red"] == "drawer"
    assert not P.precondition_holds("push_into_drawer", dataclasses.replace(s, drawer="closed"))
    assert not P.precondition_holds("push_into_drawer", sym(drawer="open"))  # two on the table


def test_toggles_and_hand_empty_rules():
    s = sym(led=0, lightbulb=1, slider="left", drawer="open")
    assert P.apply_task("turn_on_led", s).led == 1
    assert P.apply_task("turn_off_lightbulb", s).lightbulb == 0
    assert P.apply_task("move_slider_right", s).slider == "right"
    assert P.apply_task("close_drawer", s).drawer == "closed"
    for task in ("turn_off_led", "turn_on_lightbulb", "move_slider_left", "open_drawer"):
        assert not P.precondition_holds(task, s)
    held = dataclasses.replace(s, blocks={"red": "grasped", "blue": "table", "pink": "slider_left"})
    for task in (
        "turn_on_led",
        "move_slider_right",
        "close_drawer",
        "rotate_blue_block_left",
        "lift_blue_block_table",
    ):
        assert not P.precondition_holds(task, held)


def test_apply_task_rejects_a_failed_precondition():
    with pytest.raises(UserError, match="precondition"):
        P.apply_task("close_drawer", sym(drawer="closed"))
    with pytest.raises(UserError, match="Did you mean"):
        P.precondition_holds("close_drawers", sym())


# --- chains -------------------------------------------------------------------------------


def test_chains_count_length_and_start_states(chains):
    assert len(chains) == 1000
    starts = P.start_states()
    per_state = Counter(json.dumps(P.state_to_dict(c.start_state), sort_keys=True) for c in chains)
    assert len(per_state) == 192 and set(per_state.values()) == {5, 6}  # 1000 spread evenly, as CALVIN
    assert all(c.start_state in starts and len(c.tasks) == 5 for c in chains)


def test_chains_are_solvable_in_order_with_distinct_categories(chains):
    for chain in chains:
        assert len({category_of(t) for t in chain.tasks}) == 5
        states = P.chain_states(chain)  # raises if a precondition fails on the way
        assert len(states) == 6
        for state, task in zip(states, chain.tasks):
            assert P.precondition_holds(task, state)
        for state in states:
            assert_consistent(state)


def test_every_task_appears(chains):
    counts = Counter(t for c in chains for t in c.tasks)
    assert set(counts) == set(TASKS)


def test_chains_are_deterministic_for_a_seed(chains):
    assert P.generate_chains(1000, seed=0) == chains
    other = P.generate_chains(1000, seed=1)
    assert other != chains
    assert [c.tasks for c in P.generate_chains(7, seed=5)] == [c.tasks for c in P.generate_chains(7, seed=5)]


def _brute_force_count(state: SymbolicState, used: frozenset = frozenset(), depth: int = 5) -> int:
    if depth == 0:
        return 1
    total = 0
    for task in P.valid_tasks(state):
        if category_of(task) not in used:
            total += _brute_force_count(P.apply_task(task, state), used | {category_of(task)}, depth - 1)
    return total


def test_sampler_counts_match_brute_force_enumeration():
    counter = P._ChainCounter()
    for state in P.start_states()[::64]:
        assert counter.count(P._key(state), 0, 5) == _brute_force_count(state) > 0


def test_chains_are_drawn_uniformly_among_valid_sequences():
    """The first task's frequency matches the share of valid sequences that start with it."""
    state = sym(red="table", blue="slider_right", pink="slider_left", slider="left", drawer="open")
    counter = P._ChainCounter()
    options = counter.options(P._key(state), 0, 5)
    total = sum(n for _, _, n in options)
    rng = np.random.default_rng(0)
    draws = Counter(counter.sample(P._key(state), rng)[0] for _ in range(4000))
    for i, _, n in options:
        expected = 4000 * n / total
        assert abs(draws[task_names()[i]] - expected) < 5 * np.sqrt(expected) + 1


def test_chain_json_round_trip(chains):
    data = json.loads(json.dumps([c.to_dict() for c in chains[:20]]))
    assert [P.Chain.from_dict(d) for d in data] == chains[:20]
    with pytest.raises(UserError, match="Malformed"):
        P.Chain.from_dict({"start_state": {"led": 0}, "tasks": list(chains[0].tasks)})


def test_bad_chain_inputs_are_user_errors():
    with pytest.raises(UserError, match="5 tasks"):
        P.Chain(P.start_states()[0], ("open_drawer",))
    with pytest.raises(UserError, match="num_chains"):
        P.generate_chains(0)
    with pytest.raises(UserError, match="precondition"):
        P.chain_states(
            P.Chain(
                sym(drawer="closed"),
                ("close_drawer", "turn_on_led", "move_slider_left", "lift_red_block_table", "stack_block"),
            )
        )


# --- metrics ------------------------------------------------------------------------------

A = ("open_drawer", "turn_on_led", "move_slider_left", "lift_red_block_table", "stack_block")
B = ("turn_on_led", "rotate_red_block_left", "open_drawer", "lift_blue_block_table", "place_in_drawer")


def test_summarize_hand_made_example():
    results = [P.ChainResult(A, 0), P.ChainResult(A, 2), P.ChainResult(B, 5), P.ChainResult(B, 3)]
    out = P.summarize(results)
    assert out["num_chains"] == 4
    assert out["avg_len"] == pytest.approx(10 / 4)
    assert out["sr"] == pytest.approx([3 / 4, 3 / 4, 2 / 4, 1 / 4, 1 / 4])
    assert out["avg_len"] == pytest.approx(sum(out["sr"]))
    # open_drawer: A0 fail, A2 ok, B5 ok, B3 ok -> 3/4; turn_on_led: A2 ok, B5, B3 ok, A0 not reached -> 3/3;
    # move_slider_left: only A2 reaches it and fails -> 0/1; rotate: B twice ok -> 1;
    # lift_blue: B5 ok, B3 fails -> 1/2; place_in_drawer: B5 ok -> 1; A's lift/stack never reached.
    assert out["per_task"] == {
        "rotate_red_block_left": 1.0,
        "open_drawer": pytest.approx(3 / 4),
        "move_slider_left": 0.0,
        "lift_blue_block_table": 0.5,
        "place_in_drawer": 1.0,
        "turn_on_led": 1.0,
    }
    assert list(out["per_task"]) == [t for t in task_names() if t in out["per_task"]]
    assert out["chains"][1] == {"tasks": list(A), "num_success": 2}
    assert json.loads(json.dumps(out)) == out


def test_summarize_rejects_bad_results():
    with pytest.raises(UserError):
        P.summarize([])
    with pytest.raises(UserError, match="num_success"):
        P.ChainResult(A, 6)
    with pytest.raises(UserError, match="Unknown CALVIN task"):
        P.ChainResult(("open_drawer",) * 4 + ("fly",), 1)
