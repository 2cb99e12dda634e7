"""Language for the 34 CALVIN tasks: one fixed evaluation instruction per task and a set of
training paraphrases.

As in CALVIN, a policy is evaluated with exactly one instruction per task while its training
data is annotated with paraphrases; the evaluation instruction is deliberately not among the
paraphrases, so evaluation also measures generalisation to an unseen wording.
"""

from __future__ import annotations

import numpy as np

from dreamrt.sim.state import BLOCK_COLORS
from dreamrt.sim.tasks import get_task


def _per_color(
    name: str, eval_text: str, train_texts: tuple[str, ...]
) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Expand ``{c}`` in a task family's name and texts for the three block colours."""
    return {
        name.format(c=c): (eval_text.format(c=c), tuple(t.format(c=c) for t in train_texts))
        for c in BLOCK_COLORS
    }


# task -> (evaluation instruction, training paraphrases)
_LANGUAGE: dict[str, tuple[str, tuple[str, ...]]] = {
    **_per_color(
        "rotate_{c}_block_right",
        "take the {c} block and rotate it to the right",
        (
            "rotate the {c} block to the right",
            "turn the {c} block clockwise",
            "grasp the {c} block and twist it to the right",
            "spin the {c} block clockwise on the table",
            "rotate the {c} block rightwards",
            "give the {c} block a clockwise turn",
        ),
    ),
    **_per_color(
        "rotate_{c}_block_left",
        "take the {c} block and rotate it to the left",
        (
            "rotate the {c} block to the left",
            "turn the {c} block counterclockwise",
            "grasp the {c} block and twist it to the left",
            "spin the {c} block counterclockwise on the table",
            "rotate the {c} block leftwards",
            "give the {c} block a counterclockwise turn",
        ),
    ),
    **_per_color(
        "push_{c}_block_right",
        "go push the {c} block right",
        (
            "push the {c} block to the right",
            "slide the {c} block towards the right",
            "nudge the {c} block to the right side of the table",
            "shove the {c} block rightwards",
            "move the {c} block right by pushing it",
            "push the {c} block over to the right",
        ),
    ),
    **_per_color(
        "push_{c}_block_left",
        "go push the {c} block left",
        (
            "push the {c} block to the left",
            "slide the {c} block towards the left",
            "nudge the {c} block to the left side of the table",
            "shove the {c} block leftwards",
            "move the {c} block left by pushing it",
            "push the {c} block over to the left",
        ),
    ),
    "move_slider_left": (
        "push the sliding door to the left side",
        (
            "slide the door to the left",
            "move the sliding door left",
            "push the door of the cabinet to the left",
            "shift the sliding door all the way to the left",
            "grasp the door handle and slide it left",
            "move the slider to the left",
        ),
    ),
    "move_slider_right": (
        "push the sliding door to the right side",
        (
            "slide the door to the right",
            "move the sliding door right",
            "push the door of the cabinet to the right",
            "shift the sliding door all the way to the right",
            "grasp the door handle and slide it right",
            "move the slider to the right",
        ),
    ),
    "open_drawer": (
        "pull the handle to open the drawer",
        (
            "open the drawer",
            "pull the drawer open",
            "grasp the drawer handle and pull it out",
            "slide the drawer out",
            "open the drawer of the desk",
            "pull out the drawer",
        ),
    ),
    "close_drawer": (
        "push the handle to close the drawer",
        (
            "close the drawer",
            "push the drawer shut",
            "slide the drawer back in",
            "shut the drawer",
            "push the drawer closed",
            "close the drawer of the desk",
        ),
    ),
    **_per_color(
        "lift_{c}_block_table",
        "grasp and lift the {c} block",
        (
            "pick up the {c} block from the table",
            "lift the {c} block off the table",
            "grab the {c} block and raise it",
            "take the {c} block from the table",
            "pick the {c} block up",
            "hold the {c} block up in the air",
        ),
    ),
    **_per_color(
        "lift_{c}_block_slider",
        "lift the {c} block from the sliding cabinet",
        (
            "pick up the {c} block from the sliding cabinet",
            "take the {c} block out of the cabinet",
            "grasp the {c} block in the shelf and lift it",
            "lift the {c} block off the cabinet shelf",
            "grab the {c} block from behind the sliding door",
            "pick the {c} block out of the sliding cabinet",
        ),
    ),
    **_per_color(
        "lift_{c}_block_drawer",
        "take the {c} block from the drawer",
        (
            "pick up the {c} block from the drawer",
            "lift the {c} block out of the drawer",
            "grab the {c} block in the drawer and raise it",
            "take the {c} block out of the open drawer",
            "pick the {c} block out of the drawer",
            "grasp the {c} block inside the drawer and lift it",
        ),
    ),
    "place_in_slider": (
        "store the grasped block in the sliding cabinet",
        (
            "put the block in the sliding cabinet",
            "place the block you are holding on the cabinet shelf",
            "set the grasped block down in the cabinet",
            "drop the block into the sliding cabinet",
            "put the held block away in the cabinet",
            "place the block behind the sliding door",
        ),
    ),
    "place_in_drawer": (
        "store the grasped block in the drawer",
        (
            "put the block in the drawer",
            "place the block you are holding in the drawer",
            "set the grasped block down in the drawer",
            "drop the block into the drawer",
            "put the held block away in the drawer",
            "place the block inside the open drawer",
        ),
    ),
    "stack_block": (
        "stack the grasped block",
        (
            "put the block on top of the other block",
            "stack the block you are holding on another block",
            "place the grasped block onto the block on the table",
            "build a tower with the blocks",
            "set the held block down on top of another one",
            "stack the blocks",
        ),
    ),
    "unstack_block": (
        "remove the stacked block",
        (
            "take the top block off the stack",
            "unstack the blocks",
            "take the block off the other block",
            "remove the block from the top of the tower",
            "lift the upper block off the stack",
            "separate the stacked blocks",
        ),
    ),
    "turn_on_lightbulb": (
        "use the switch to turn on the light bulb",
        (
            "turn on the light bulb",
            "move the switch up to switch on the yellow light",
            "switch the lamp on",
            "push the switch upwards",
            "turn the yellow light on",
            "flip the switch to light the bulb",
        ),
    ),
    "turn_off_lightbulb": (
        "use the switch to turn off the light bulb",
        (
            "turn off the light bulb",
            "move the switch down to switch off the yellow light",
            "switch the lamp off",
            "push the switch downwards",
            "turn the yellow light off",
            "flip the switch to put out the bulb",
        ),
    ),
    "turn_on_led": (
        "press the button to turn on the led light",
        (
            "turn on the green light",
            "push the button to switch the led on",
            "press the button so the green lamp lights up",
            "switch on the led",
            "toggle the led on with the button",
            "push down the button to light the led",
        ),
    ),
    "turn_off_led": (
        "press the button to turn off the led light",
        (
            "turn off the green light",
            "push the button to switch the led off",
            "press the button so the green lamp goes dark",
            "switch off the led",
            "toggle the led off with the button",
            "push down the button to put out the led",
        ),
    ),
    "push_into_drawer": (
        "slide the block so that it falls into the drawer",
        (
            "push the block into the drawer",
            "sweep the block off the table into the open drawer",
            "slide the block over the edge into the drawer",
            "shove the block into the drawer",
            "push the block on the table so it drops into the drawer",
            "nudge the block into the open drawer",
        ),
    ),
}


def eval_instruction(task: str) -> str:
    """The one instruction the policy receives for ``task`` during evaluation."""
    return _LANGUAGE[get_task(task).name][0]


def train_instructions(task: str) -> list[str]:
    """The training paraphrases of ``task`` (at least five, none equal to the evaluation one)."""
    return list(_LANGUAGE[get_task(task).name][1])


def sample_instruction(task: str, rng: np.random.Generator) -> str:
    """One training paraphrase of ``task``, drawn uniformly with ``rng``."""
    options = _LANGUAGE[get_task(task).name][1]
    return options[int(rng.integers(len(options)))]
