"""Success checks of the 34 CALVIN tasks on constructed scenes, and their language."""

from __future__ import annotations

import dataclasses
import pathlib
from collections import Counter

import numpy as np
import pytest

from dreamrt.errors import UserError
from dreamrt.sim import language
from dreamrt.sim.state import BLOCK_COLORS, BlockState, SceneState
from dreamrt.sim.tasks import (
    CATEGORIES,
    TASKS,
    category_of,
    check_success,
    euler_to_matrix,
    matrix_to_euler,
    relative_rotation_deg,
    task_names,
)

DEG = np.pi / 180
TABLE_Z = 0.46
SOURCE_SURFACE = {"table": "table", "slider": "slider_cabinet", "drawer": "drawer"}


def block(pos, contacts=("table",), euler=(0.0, 0.0, 0.0), vel=(0.0, 0.0, 0.0)) -> BlockState:
    return BlockState(
        pos=np.array(pos, dtype=float),
        euler=np.array(euler, dtype=float),
        lin_vel=np.array(vel, dtype=float),
        contacts=frozenset(contacts),
    )


def base_scene(**changes) -> SceneState:
    """Red and blue on the table, pink in the slider cabinet, everything closed and off."""
    scene = SceneState(
        slider=0.0,
        drawer=0.0,
        button=0.0,
        switch=0.0,
        lightbulb=0,
        led=0,
        blocks={
            "red": block((0.10, -0.10, TABLE_Z)),
            "blue": block((0.25, -0.10, TABLE_Z)),
            "pink": block((-0.20, 0.08, 0.50), contacts=("slider_cabinet",)),
        },
    )
    return dataclasses.replace(scene, **changes)


def with_block(scene: SceneState, color: str, **changes) -> SceneState:
    """``scene`` with block ``color``'s fields replaced; pos/euler/lin_vel as sequences, contacts as a set."""
    b = scene.blocks[color]
    fields = {
        "pos": np.array(changes.get("pos", b.pos), dtype=float),
        "euler": np.array(changes.get("euler", b.euler), dtype=float),
        "lin_vel": np.array(changes.get("lin_vel", b.lin_vel), dtype=float),
        "contacts": frozenset(changes.get("contacts", b.contacts)),
    }
    return dataclasses.replace(scene, blocks={**scene.blocks, color: BlockState(**fields)})


def moved(scene: SceneState, color: str, dx=0.0, dy=0.0, dz=0.0, **changes) -> SceneState:
    pos = scene.blocks[color].pos + np.array([dx, dy, dz])
    return with_block(scene, color, pos=pos, **changes)


def at_source(color: str, source: str) -> SceneState:
    """A scene with ``color`` resting on ``source`` (the others elsewhere, not touching it)."""
    scene = base_scene()
    for other in BLOCK_COLORS:
        scene = with_block(
            scene, other, contacts={"table"}, pos=(0.3 + 0.1 * BLOCK_COLORS.index(other), -0.1, TABLE_Z)
        )
    z = {"table": TABLE_Z, "slider": 0.50, "drawer": 0.38}[source]
    return with_block(scene, color, pos=(0.0, 0.0, z), contacts={SOURCE_SURFACE[source]})


NearMiss = SceneState | tuple[SceneState, SceneState]


def _cases() -> dict[str, tuple[SceneState, SceneState, dict[str, NearMiss]]]:
    """task -> (start, a scene where it succeeded, {near miss: a scene where it did not, or a
    (start, now) pair where the near miss lies in the start})."""
    cases = {}
    for color in BLOCK_COLORS:
        s = at_source(color, "table")
        for side, sign in (("left", 1), ("right", -1)):
            cases[f"rotate_{color}_block_{side}"] = (
                s,
                with_block(s, color, euler=(0, 0, sign * 70 * DEG)),
                {
                    "55 deg": with_block(s, color, euler=(0, 0, sign * 55 * DEG)),
                    "wrong way": with_block(s, color, euler=(0, 0, -sign * 70 * DEG)),
                    "tilted 35 deg": with_block(s, color, euler=(35 * DEG, 0, sign * 70 * DEG)),
                    "pitched 35 deg": with_block(s, color, euler=(0, 35 * DEG, sign * 70 * DEG)),
                    "moved 0.12 m": moved(s, color, dy=0.12, euler=(0, 0, sign * 70 * DEG)),
                    "held by the robot": with_block(
                        s, color, euler=(0, 0, sign * 70 * DEG), contacts={"robot"}
                    ),
                },
            )
        for side, sign in (("right", -1), ("left", 1)):
            cases[f"push_{color}_block_{side}"] = (
                s,
                moved(s, color, dx=sign * 0.15, contacts={"table", "robot"}),
                {
                    "moved 0.09 m": moved(s, color, dx=sign * 0.09),
                    "wrong way": moved(s, color, dx=-sign * 0.15),
                    "carried, table lost": moved(s, color, dx=sign * 0.15, dz=0.05, contacts={"robot"}),
                    "moved along y": moved(s, color, dy=sign * 0.15),
                },
            )
    s = base_scene()
    cases["move_slider_left"] = (s, base_scene(slider=0.20), {"+0.14": base_scene(slider=0.14)})
    cases["move_slider_right"] = (
        base_scene(slider=0.28),
        base_scene(slider=0.10),
        {"-0.14": base_scene(slider=0.14), "wrong way": base_scene(slider=0.28)},
    )
    cases["open_drawer"] = (s, base_scene(drawer=0.13), {"+0.11": base_scene(drawer=0.11)})
    cases["close_drawer"] = (
        base_scene(drawer=0.22),
        base_scene(drawer=0.05),
        {"-0.11": base_scene(drawer=0.11), "opened further": base_scene(drawer=0.22)},
    )
    for color in BLOCK_COLORS:
        for source, dz in (("table", 0.05), ("slider", 0.03), ("drawer", 0.05)):
            s = at_source(color, source)
            other_source = "drawer" if source == "table" else "table"
            wrong = at_source(color, other_source)
            cases[f"lift_{color}_block_{source}"] = (
                s,
                moved(s, color, dz=dz + 0.01, contacts={"robot"}),
                {
                    f"lifted only {dz - 0.01:.2f} m": moved(s, color, dz=dz - 0.01, contacts={"robot"}),
                    "source still touching": moved(
                        s, color, dz=dz + 0.01, contacts={"robot", SOURCE_SURFACE[source]}
                    ),
                    "another block touching": moved(s, color, dz=dz + 0.01, contacts={"robot", "blue_block"}),
                    "pushed up without the robot": moved(s, color, dz=dz + 0.01, contacts={"furniture"}),
                    f"started on the {other_source}": (
                        wrong,
                        moved(wrong, color, dz=dz + 0.01, contacts={"robot"}),
                    ),
                    "source surface not touched at the start": (
                        with_block(s, color, contacts={"robot"}),
                        moved(s, color, dz=dz + 0.01, contacts={"robot"}),
                    ),
                },
            )
    # The robot holds red in the air; blue on the table, pink in the cabinet.
    held = moved(base_scene(), "red", dz=0.15, contacts={"robot"})
    # The start must hold exactly one block, touching only the robot.
    two_held = with_block(held, "blue", contacts={"robot", "table"})
    for task, surface, other in (
        ("place_in_slider", "slider_cabinet", "drawer"),
        ("place_in_drawer", "drawer", "slider_cabinet"),
    ):
        cases[task] = (
            held,
            with_block(held, "red", contacts={surface}),
            {
                "still held": with_block(held, "red", contacts={surface, "robot"}),
                "placed elsewhere": with_block(held, "red", contacts={other}),
                "dropped on the table": with_block(held, "red", contacts={"table"}),
                "two blocks touch the robot": (two_held, with_block(two_held, "red", contacts={surface})),
                "held block also touches the table": (
                    with_block(held, "red", contacts={"robot", "table"}),
                    with_block(held, "red", contacts={surface}),
                ),
            },
        )
    cases["stack_block"] = (
        held,
        with_block(held, "red", contacts={"blue_block"}, pos=(0.25, -0.10, TABLE_Z + 0.05)),
        {
            "still moving": with_block(held, "red", contacts={"blue_block"}, lin_vel=(0.2, 0.0, 0.0)),
            "also on the table": with_block(held, "red", contacts={"blue_block", "table"}),
            "still held": with_block(held, "red", contacts={"blue_block", "robot"}),
            "on the table": with_block(held, "red", contacts={"table"}),
            "already stacked at the start": (
                with_block(held, "red", contacts={"blue_block", "robot"}),
                with_block(held, "red", contacts={"blue_block"}),
            ),
        },
    )
    stacked = with_block(
        with_block(base_scene(), "red", contacts={"blue_block"}), "blue", contacts={"table", "red_block"}
    )
    unstacked = with_block(stacked, "blue", contacts={"table"})
    cases["unstack_block"] = (
        stacked,
        moved(unstacked, "red", dz=0.05, contacts={"robot"}),
        {
            "still on the block": with_block(stacked, "red", contacts={"blue_block", "robot"}),
            "slid down but leaning": with_block(stacked, "red", contacts={"blue_block", "table"}),
            "was not on a block only": (
                with_block(stacked, "red", contacts={"blue_block", "robot"}),
                moved(unstacked, "red", dz=0.05, contacts={"robot"}),
            ),
        },
    )
    for light in ("lightbulb", "led"):
        off, on = base_scene(**{light: 0}), base_scene(**{light: 1})
        cases[f"turn_on_{light}"] = (
            off,
            on,
            {"stayed off": off, "the other light": base_scene(**{_other(light): 1})},
        )
        cases[f"turn_off_{light}"] = (on, off, {"stayed on": on})
    s = base_scene(drawer=0.22)
    cases["push_into_drawer"] = (
        s,
        moved(s, "red", dy=-0.2, dz=-0.08, contacts={"drawer"}),
        {
            "still on the table": moved(s, "red", dy=-0.05),
            "robot still touching": moved(s, "red", dy=-0.2, dz=-0.08, contacts={"drawer", "robot"}),
            "robot touched it at the start": (
                with_block(s, "red", contacts={"table", "robot"}),
                moved(s, "red", dy=-0.2, dz=-0.08, contacts={"drawer"}),
            ),
            "started in the cabinet": (
                with_block(s, "red", contacts={"slider_cabinet"}),
                moved(s, "red", dy=-0.2, dz=-0.08, contacts={"drawer"}),
            ),
        },
    )
    return cases


def _other(light: str) -> str:
    return "led" if light == "lightbulb" else "lightbulb"


CASES = _cases()


def test_cases_cover_all_34_tasks():
    assert len(TASKS) == 34 and len(set(task_names())) == 34
    assert set(CASES) == set(TASKS)


@pytest.mark.parametrize("task", task_names())
def test_check_fires_on_scripted_success(task):
    start, success, _ = CASES[task]
    assert check_success(task, start, success)


@pytest.mark.parametrize("task", task_names())
def test_check_does_not_fire_on_near_misses(task):
    start, _, near_misses = CASES[task]
    assert near_misses
    pairs = {name: miss if isinstance(miss, tuple) else (start, miss) for name, miss in near_misses.items()}
    fired = [name for name, (s, now) in pairs.items() if check_success(task, s, now)]
    assert not fired


@pytest.mark.parametrize("task", task_names())
def test_nothing_happens_nothing_succeeds(task):
    for start, _, _ in CASES.values():
        assert not check_success(task, start, start)


def test_a_success_is_only_its_own_task():
    """A scripted rotation, push or lift is not also another task of a different kind."""
    for task in ("rotate_red_block_left", "push_blue_block_right", "lift_pink_block_table", "open_drawer"):
        start, success, _ = CASES[task]
        fired = {t for t in TASKS if check_success(t, start, success)}
        assert fired == {task}


def test_rotation_wraps_yaw_across_pi():
    s = at_source("red", "table")
    start = with_block(s, "red", euler=(0, 0, 170 * DEG))
    now = with_block(s, "red", euler=(0, 0, -120 * DEG))  # +70 deg through the +-180 seam
    assert check_success("rotate_red_block_left", start, now)
    assert not check_success("rotate_red_block_right", start, now)
    start = with_block(s, "red", euler=(0, 0, -175 * DEG))
    now = with_block(s, "red", euler=(0, 0, 115 * DEG))  # -70 deg
    assert check_success("rotate_red_block_right", start, now)
    assert not check_success("rotate_red_block_left", start, now)
    # A naive difference would call this a 340 deg turn; it is a 20 deg one.
    now = with_block(s, "red", euler=(0, 0, 165 * DEG))
    assert not check_success("rotate_red_block_right", start, now)
    assert not check_success("rotate_red_block_left", start, now)


def test_rotation_of_a_block_lying_on_its_side_is_about_the_world_z_axis():
    s = at_source("blue", "table")
    start_euler = np.array([90 * DEG, 0.0, 20 * DEG])
    turned = euler_to_matrix(np.array([0, 0, 75 * DEG])) @ euler_to_matrix(start_euler)
    start = with_block(s, "blue", euler=start_euler)
    now = with_block(s, "blue", euler=matrix_to_euler(turned))
    assert check_success("rotate_blue_block_left", start, now)
    # Rolling it by 75 deg about its own long axis changes roll, not yaw.
    now = with_block(s, "blue", euler=start_euler + np.array([75 * DEG, 0, 0]))
    assert not check_success("rotate_blue_block_left", start, now)


def test_euler_round_trip_and_relative_rotation():
    rng = np.random.default_rng(0)
    for _ in range(50):
        e = rng.uniform([-np.pi, -1.4, -np.pi], [np.pi, 1.4, np.pi])
        np.testing.assert_allclose(matrix_to_euler(euler_to_matrix(e)), e, atol=1e-9)
        np.testing.assert_allclose(relative_rotation_deg(e, e), 0.0, atol=1e-6)


def test_categories_follow_calvin():
    assert len(CATEGORIES) == 11
    counts = Counter(category_of(t) for t in TASKS)
    assert set(counts) == set(CATEGORIES)
    assert counts["move_block"] == 12 and counts["lights"] == 4
    assert counts["lift_table"] == counts["lift_slider"] == counts["lift_drawer"] == 3
    assert counts["slider"] == counts["drawer"] == counts["place"] == 2
    assert counts["stack"] == counts["unstack"] == counts["push_into_drawer"] == 1
    assert category_of("rotate_red_block_left") == category_of("push_pink_block_right")


def test_unknown_task_is_a_user_error_with_a_suggestion():
    s = base_scene()
    with pytest.raises(UserError, match="Did you mean 'open_drawer'"):
        check_success("open_drawr", s, s)
    with pytest.raises(UserError, match="Unknown CALVIN task"):
        language.eval_instruction("fly_away")


# --- language -----------------------------------------------------------------------------


def test_every_task_has_one_eval_instruction_and_five_paraphrases():
    evals = [language.eval_instruction(t) for t in task_names()]
    assert len(set(evals)) == 34
    for task in task_names():
        train = language.train_instructions(task)
        assert len(train) >= 5 and len(set(train)) == len(train)
        assert language.eval_instruction(task) not in train
        for color in BLOCK_COLORS:
            if f"_{color}_" in task:  # the wording names the block it is about, and no other
                assert all(color in text for text in [language.eval_instruction(task), *train])
                assert not any(c in text for text in train for c in BLOCK_COLORS if c != color)


def test_paraphrases_are_not_shared_between_tasks():
    owner: dict[str, str] = {}
    for task in task_names():
        for text in language.train_instructions(task):
            assert owner.setdefault(text, task) == task, text


def test_sample_instruction_is_seeded_and_covers_the_paraphrases():
    task = "move_slider_left"
    a = [language.sample_instruction(task, np.random.default_rng(3)) for _ in range(3)]
    assert len(set(a)) == 1
    rng = np.random.default_rng(0)
    seen = {language.sample_instruction(task, rng) for _ in range(200)}
    assert seen == set(language.train_instructions(task))


def test_protocol_doc_lists_every_task_and_eval_instruction():
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "calvin_protocol.md").read_text()
    for task in task_names():
        assert f"`{task}`" in doc, task
        assert language.eval_instruction(task) in doc, task
