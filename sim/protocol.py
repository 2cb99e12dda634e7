"""CALVIN's long-horizon evaluation protocol on symbolic states.

Three parts:

1. Task semantics. Each of the 34 tasks has a precondition on a
   :class:`~dreamrt.sim.state.SymbolicState` and an effect (the symbolic state once it has
   succeeded), following CALVIN's ``multistep_sequences.py`` with the changes listed in
   ``docs/calvin_protocol.md`` that make every generated chain physically solvable in order.
2. The 192 start states and the generator of evaluation chains: five tasks from five distinct
   categories, each one's precondition holding in the state the previous ones leave.
3. The metrics: SR_1..SR_5, average length and per-task success rates of a set of rollouts.

Rules worth knowing (they are what a policy is asked to do):
- At most one block is grasped; a grasped block is released only by place_in_slider,
  place_in_drawer or stack_block, so every other task requires an empty gripper.
- The sliding door covers one compartment of the cabinet: with the door on the left
  (slider "left") only ``slider_right`` is reachable, and vice versa. Lifting from and placing
  into the cabinet use the uncovered compartment, which holds at most one block.
- ``stacked`` means "resting on the one block that is on the table": stack_block needs exactly
  one block free on the table, so the base is never ambiguous, and while a stack stands the
  base counts as covered (no rotating, pushing or lifting it) until unstack_block puts the top
  block back on the table.
- push_into_drawer needs exactly one block free on the table (the one pushed) and an open drawer.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dreamrt.errors import UserError
from dreamrt.sim.state import BLOCK_COLORS, SymbolicState
from dreamrt.sim.tasks import CATEGORIES, TASKS, category_of, get_task, task_names

CHAIN_LENGTH = 5
NUM_START_STATES = 192
# The compartment of the slider cabinet that the door leaves reachable, by door position.
UNCOVERED_SLIDER_SIDE = {"left": "slider_right", "right": "slider_left"}
# Locations a start state may put a block in.
START_LOCATIONS = ("table", "slider_left", "slider_right")


# --- queries on a symbolic state ---------------------------------------------------------


def grasped_block(state: SymbolicState) -> str | None:
    """The colour of the block the robot holds, or None."""
    held = [c for c in BLOCK_COLORS if state.blocks[c] == "grasped"]
    assert len(held) <= 1, state
    return held[0] if held else None


def stacked_block(state: SymbolicState) -> str | None:
    """The colour of the block resting on another block, or None."""
    top = [c for c in BLOCK_COLORS if state.blocks[c] == "stacked"]
    assert len(top) <= 1, state
    return top[0] if top else None


def stack_base(state: SymbolicState) -> str | None:
    """The block the stacked block rests on: the only block on the table (None without a stack)."""
    if stacked_block(state) is None:
        return None
    on_table = [c for c in BLOCK_COLORS if state.blocks[c] == "table"]
    assert len(on_table) == 1, state
    return on_table[0]


def free_table_blocks(state: SymbolicState) -> list[str]:
    """Blocks on the table that nothing rests on (while a stack stands, the only table block is its base)."""
    if stacked_block(state) is not None:
        return []
    return [c for c in BLOCK_COLORS if state.blocks[c] == "table"]


def uncovered_slider_side(state: SymbolicState) -> str:
    """``slider_left`` or ``slider_right``: the compartment the door leaves reachable."""
    return UNCOVERED_SLIDER_SIDE[state.slider]


def _moved(state: SymbolicState, color: str, where: str) -> SymbolicState:
    return dataclasses.replace(state, blocks={**state.blocks, color: where})


def _single(blocks: list[str]) -> str | None:
    return blocks[0] if len(blocks) == 1 else None


# --- task semantics ----------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A task's symbolic semantics: ``effect`` is only defined where ``precondition`` holds."""

    precondition: Callable[[SymbolicState], bool]
    effect: Callable[[SymbolicState], SymbolicState]
    precondition_text: str
    effect_text: str


def _empty_hand(state: SymbolicState) -> bool:
    return grasped_block(state) is None


def _rules() -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for color in BLOCK_COLORS:

        def free_on_table(s: SymbolicState, color: str = color) -> bool:
            return _empty_hand(s) and color in free_table_blocks(s)

        same = Rule(free_on_table, lambda s: s, f"{color} free on the table, hand empty", "none")
        for side in ("left", "right"):
            rules[f"rotate_{color}_block_{side}"] = same
            rules[f"push_{color}_block_{side}"] = same
    rules["move_slider_left"] = Rule(
        lambda s: _empty_hand(s) and s.slider == "right",
        lambda s: dataclasses.replace(s, slider="left"),
        "slider right, hand empty",
        "slider left",
    )
    rules["move_slider_right"] = Rule(
        lambda s: _empty_hand(s) and s.slider == "left",
        lambda s: dataclasses.replace(s, slider="right"),
        "slider left, hand empty",
        "slider right",
    )
    rules["open_drawer"] = Rule(
        lambda s: _empty_hand(s) and s.drawer == "closed",
        lambda s: dataclasses.replace(s, drawer="open"),
        "drawer closed, hand empty",
        "drawer open",
    )
    rules["close_drawer"] = Rule(
        lambda s: _empty_hand(s) and s.drawer == "open",
        lambda s: dataclasses.replace(s, drawer="closed"),
        "drawer open, hand empty",
        "drawer closed",
    )
    for color in BLOCK_COLORS:

        def from_table(s: SymbolicState, color: str = color) -> bool:
            return _empty_hand(s) and color in free_table_blocks(s)

        def from_slider(s: SymbolicState, color: str = color) -> bool:
            return _empty_hand(s) and s.blocks[color] == uncovered_slider_side(s)

        def from_drawer(s: SymbolicState, color: str = color) -> bool:
            return _empty_hand(s) and s.blocks[color] == "drawer" and s.drawer == "open"

        def lifted(s: SymbolicState, color: str = color) -> SymbolicState:
            return _moved(s, color, "grasped")

        rules[f"lift_{color}_block_table"] = Rule(
            from_table, lifted, f"{color} free on the table, hand empty", f"{color} grasped"
        )
        rules[f"lift_{color}_block_slider"] = Rule(
            from_slider,
            lifted,
            f"{color} in the uncovered slider compartment (slider_left with the slider right, slider_right "
            "with the slider left), hand empty",
            f"{color} grasped",
        )
        rules[f"lift_{color}_block_drawer"] = Rule(
            from_drawer, lifted, f"{color} in the drawer, drawer open, hand empty", f"{color} grasped"
        )

    def place_slider_ok(s: SymbolicState) -> bool:
        side = uncovered_slider_side(s)
        return grasped_block(s) is not None and all(s.blocks[c] != side for c in BLOCK_COLORS)

    rules["place_in_slider"] = Rule(
        place_slider_ok,
        lambda s: _moved(s, grasped_block(s), uncovered_slider_side(s)),
        "a block grasped, the uncovered slider compartment empty",
        "the grasped block in the uncovered compartment, hand empty",
    )
    rules["place_in_drawer"] = Rule(
        lambda s: grasped_block(s) is not None and s.drawer == "open",
        lambda s: _moved(s, grasped_block(s), "drawer"),
        "a block grasped, drawer open",
        "the grasped block in the drawer, hand empty",
    )
    rules["stack_block"] = Rule(
        lambda s: grasped_block(s) is not None and len(free_table_blocks(s)) == 1,
        lambda s: _moved(s, grasped_block(s), "stacked"),
        "a block grasped, exactly one block free on the table",
        "the grasped block stacked on the table block, hand empty",
    )
    rules["unstack_block"] = Rule(
        lambda s: _empty_hand(s) and stacked_block(s) is not None,
        lambda s: _moved(s, stacked_block(s), "table"),
        "a block stacked, hand empty",
        "the stacked block on the table",
    )
    for light in ("lightbulb", "led"):
        for before, verb in ((0, "on"), (1, "off")):

            def light_pre(s: SymbolicState, light: str = light, before: int = before) -> bool:
                return _empty_hand(s) and getattr(s, light) == before

            def light_eff(s: SymbolicState, light: str = light, before: int = before) -> SymbolicState:
                return dataclasses.replace(s, **{light: 1 - before})

            rules[f"turn_{verb}_{light}"] = Rule(
                light_pre, light_eff, f"{light} {before}, hand empty", f"{light} {1 - before}"
            )
    rules["push_into_drawer"] = Rule(
        lambda s: _empty_hand(s) and s.drawer == "open" and len(free_table_blocks(s)) == 1,
        lambda s: _moved(s, _single(free_table_blocks(s)), "drawer"),
        "exactly one block on the table and no stack, drawer open, hand empty",
        "that block in the drawer",
    )
    assert set(rules) == set(TASKS), set(rules) ^ set(TASKS)
    return {name: rules[name] for name in TASKS}


RULES: dict[str, Rule] = _rules()


def precondition_holds(task: str, state: SymbolicState) -> bool:
    """Whether ``task`` can be asked for in ``state``."""
    return bool(RULES[get_task(task).name].precondition(state))


def apply_task(task: str, state: SymbolicState) -> SymbolicState:
    """The symbolic state after ``task`` succeeds in ``state``; a UserError if its precondition fails."""
    rule = RULES[get_task(task).name]
    if not rule.precondition(state):
        raise UserError(
            f"Task {task!r} cannot follow state {state}: its precondition is "
            f"'{rule.precondition_text}'. Pick a task valid in that state (see valid_tasks())."
        )
    return rule.effect(state)


def valid_tasks(state: SymbolicState) -> list[str]:
    """The tasks whose precondition holds in ``state``, in TASKS order."""
    return [name for name, rule in RULES.items() if rule.precondition(state)]


# --- start states ------------------------------------------------------------------------


def start_states() -> list[SymbolicState]:
    """CALVIN's 192 start states in a fixed order: LED, lightbulb in {0, 1}, slider in
    {left, right}, drawer in {closed, open}, each block on the table or in the left/right
    slider compartment, with one or two blocks on the table and at most one per compartment."""
    states = []
    for led, bulb, slider, drawer in itertools.product((0, 1), (0, 1), ("left", "right"), ("closed", "open")):
        for where in itertools.product(START_LOCATIONS, repeat=len(BLOCK_COLORS)):
            if (
                where.count("table") not in (1, 2)
                or where.count("slider_left") > 1
                or where.count("slider_right") > 1
            ):
                continue
            blocks = dict(zip(BLOCK_COLORS, where))
            states.append(SymbolicState(led=led, lightbulb=bulb, slider=slider, drawer=drawer, blocks=blocks))
    assert len(states) == NUM_START_STATES, len(states)
    return states


# --- chains ------------------------------------------------------------------------------


def state_to_dict(state: SymbolicState) -> dict:
    """A JSON-ready copy of ``state``."""
    return {
        "led": int(state.led),
        "lightbulb": int(state.lightbulb),
        "slider": state.slider,
        "drawer": state.drawer,
        "blocks": {c: state.blocks[c] for c in BLOCK_COLORS},
    }


def state_from_dict(data: dict) -> SymbolicState:
    """The inverse of :func:`state_to_dict`; a UserError on a malformed mapping."""
    try:
        return SymbolicState(
            led=int(data["led"]),
            lightbulb=int(data["lightbulb"]),
            slider=data["slider"],
            drawer=data["drawer"],
            blocks=dict(data["blocks"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"Malformed symbolic state {data!r}: {err}. Expected keys led, lightbulb (0/1), slider "
            "(left/right), drawer (open/closed) and blocks (colour -> location), as written by state_to_dict()."
        ) from err


@dataclass(frozen=True)
class Chain:
    """One evaluation chain: a start state and the five tasks asked for in order."""

    start_state: SymbolicState
    tasks: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if len(self.tasks) != CHAIN_LENGTH:
            raise UserError(f"A chain has {CHAIN_LENGTH} tasks, got {len(self.tasks)}: {list(self.tasks)}.")
        for name in self.tasks:
            get_task(name)

    def to_dict(self) -> dict:
        return {"start_state": state_to_dict(self.start_state), "tasks": list(self.tasks)}

    @staticmethod
    def from_dict(data: dict) -> Chain:
        if not isinstance(data, dict) or "start_state" not in data or "tasks" not in data:
            raise UserError(f"Malformed chain {data!r}: expected a mapping with 'start_state' and 'tasks'.")
        return Chain(state_from_dict(data["start_state"]), tuple(data["tasks"]))


def chain_states(chain: Chain) -> list[SymbolicState]:
    """The symbolic states along ``chain``: the start state, then the state after each task
    (CHAIN_LENGTH + 1 states); a UserError if a task's precondition does not hold on the way."""
    states = [chain.start_state]
    for task in chain.tasks:
        states.append(apply_task(task, states[-1]))
    return states


_Key = tuple  # (led, lightbulb, slider, drawer, red, blue, pink): a hashable SymbolicState


def _key(state: SymbolicState) -> _Key:
    return (state.led, state.lightbulb, state.slider, state.drawer, *(state.blocks[c] for c in BLOCK_COLORS))


def _unkey(key: _Key) -> SymbolicState:
    led, bulb, slider, drawer, *where = key
    return SymbolicState(
        led=led, lightbulb=bulb, slider=slider, drawer=drawer, blocks=dict(zip(BLOCK_COLORS, where))
    )


class _ChainCounter:
    """Counts the valid task sequences from a state, so chains can be drawn uniformly among
    them: CALVIN draws five distinct tasks uniformly and keeps the draw if it is a valid
    chain, which is the same distribution, but rejection needs millions of draws here."""

    def __init__(self) -> None:
        names = task_names()
        self._names = names
        self._cat_bit = [1 << CATEGORIES.index(category_of(n)) for n in names]
        self._succ: dict[_Key, list[tuple[int, _Key]]] = {}
        self._count: dict[tuple[_Key, int, int], int] = {}

    def successors(self, key: _Key) -> list[tuple[int, _Key]]:
        if key not in self._succ:
            state = _unkey(key)
            self._succ[key] = [
                (i, _key(RULES[n].effect(state)))
                for i, n in enumerate(self._names)
                if RULES[n].precondition(state)
            ]
        return self._succ[key]

    def options(self, key: _Key, used: int, remaining: int) -> list[tuple[int, _Key, int]]:
        """(task index, next state, number of completions) for each task that can come next."""
        out = []
        for i, nxt in self.successors(key):
            bit = self._cat_bit[i]
            if used & bit:
                continue
            n = self.count(nxt, used | bit, remaining - 1)
            if n:
                out.append((i, nxt, n))
        return out

    def count(self, key: _Key, used: int, remaining: int) -> int:
        """Number of valid sequences of ``remaining`` tasks from ``key`` avoiding ``used`` categories."""
        if remaining == 0:
            return 1
        memo = (key, used, remaining)
        if memo not in self._count:
            self._count[memo] = sum(n for _, _, n in self.options(key, used, remaining))
        return self._count[memo]

    def sample(self, start: _Key, rng: np.random.Generator) -> tuple[str, ...]:
        key, used, tasks = start, 0, []
        for remaining in range(CHAIN_LENGTH, 0, -1):
            options = self.options(key, used, remaining)
            total = sum(n for _, _, n in options)
            assert total > 0, (start, tasks)
            # An exact integer draw: each option wins in proportion to its completions.
            cumulative = np.cumsum([n for _, _, n in options])
            i, key, _ = options[int(np.searchsorted(cumulative, int(rng.integers(total)), side="right"))]
            tasks.append(self._names[i])
            used |= self._cat_bit[i]
        return tuple(tasks)


def generate_chains(num_chains: int = 1000, seed: int = 0) -> list[Chain]:
    """``num_chains`` evaluation chains, deterministic for ``seed``.

    As in CALVIN, the chains are spread evenly over the 192 start states (the first
    ``num_chains % 192`` states get one more), each chain is drawn uniformly among the valid
    five-task sequences from its start state, and the list is shuffled."""
    if isinstance(num_chains, bool) or not isinstance(num_chains, (int, np.integer)) or num_chains < 1:
        raise UserError(f"num_chains must be a positive integer, got {num_chains!r}; CALVIN uses 1000.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}.")
    rng = np.random.default_rng(int(seed))
    counter = _ChainCounter()
    states = start_states()
    per_state = [num_chains // len(states) + (i < num_chains % len(states)) for i in range(len(states))]
    chains = [
        Chain(state, counter.sample(_key(state), rng))
        for state, n in zip(states, per_state)
        for _ in range(n)
    ]
    return [chains[i] for i in rng.permutation(len(chains))]


# --- metrics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainResult:
    """The outcome of one chain: its tasks and how many succeeded in a row from the first."""

    tasks: tuple[str, ...]
    num_success: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if len(self.tasks) != CHAIN_LENGTH:
            raise UserError(
                f"A chain result needs {CHAIN_LENGTH} tasks, got {len(self.tasks)}: {list(self.tasks)}."
            )
        for name in self.tasks:
            get_task(name)
        if isinstance(self.num_success, bool) or not 0 <= int(self.num_success) <= CHAIN_LENGTH:
            raise UserError(
                f"num_success must be an integer in [0, {CHAIN_LENGTH}], got {self.num_success!r}."
            )
        object.__setattr__(self, "num_success", int(self.num_success))


def summarize(results: Sequence[ChainResult]) -> dict:
    """CALVIN's metrics over chain rollouts, as the evaluation job writes them to JSON:

    ``{"avg_len": float, "sr": [SR_1..SR_5], "per_task": {task: rate}, "num_chains": int,
    "chains": [{"tasks": [...], "num_success": k}]}``

    SR_k is the share of chains whose first k tasks all succeeded; avg_len is the mean number
    of consecutive successes (equal to the sum of the SR_k). A task is attempted when the chain
    reaches it (all earlier tasks succeeded); its rate is successes / attempts, and tasks never
    attempted are left out of ``per_task``.
    """
    results = list(results)
    if not results:
        raise UserError("summarize() needs at least one ChainResult, got none; run some chains first.")
    n = len(results)
    counts = task_counts([(r.tasks, r.num_success) for r in results])
    return {
        "avg_len": sum(r.num_success for r in results) / n,
        "sr": success_rates([r.num_success for r in results], CHAIN_LENGTH),
        "per_task": {t: counts[t][1] / counts[t][0] for t in task_names() if t in counts},
        "num_chains": n,
        "chains": [{"tasks": list(r.tasks), "num_success": r.num_success} for r in results],
    }


def task_counts(results: Sequence[tuple[Sequence[str], int]]) -> dict[str, tuple[int, int]]:
    """{task: (attempts, successes)} over (tasks, num_success) episodes of any length: an episode
    attempts its tasks up to and including the first failure."""
    counts: dict[str, tuple[int, int]] = {}
    for tasks, num_success in results:
        for i, task in enumerate(tasks[: num_success + 1]):
            attempts, successes = counts.get(task, (0, 0))
            counts[task] = (attempts + 1, successes + int(i < num_success))
    return counts


def success_rates(num_success: Sequence[int], length: int) -> list[float]:
    """SR_1..SR_length: the share of chains whose first k tasks all succeeded."""
    return [sum(done >= k for done in num_success) / len(num_success) for k in range(1, length + 1)]


@functools.lru_cache(maxsize=1)
def reachable_states() -> tuple[SymbolicState, ...]:
    """Every symbolic state reachable from the 192 start states by valid tasks (1744), in BFS order:
    the states a chain can leave the scene in, and so the states a policy must act from."""
    seen: dict[str, SymbolicState] = {}
    queue = deque(start_states())
    for state in queue:
        seen.setdefault(state_key(state), state)
    while queue:
        state = queue.popleft()
        for task in valid_tasks(state):
            nxt = apply_task(task, state)
            if state_key(nxt) not in seen:
                seen[state_key(nxt)] = nxt
                queue.append(nxt)
    return tuple(seen.values())


@functools.lru_cache(maxsize=64)
def states_for(task: str) -> tuple[SymbolicState, ...]:
    """The reachable states in which ``task``'s precondition holds."""
    return tuple(s for s in reachable_states() if precondition_holds(task, s))


def state_key(state: SymbolicState) -> str:
    """A hashable identity of a symbolic state (SymbolicState holds a dict, so it is not hashable)."""
    return repr(state_to_dict(state))
