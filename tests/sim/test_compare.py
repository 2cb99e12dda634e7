"""`dreamrt eval compare`: two real evaluations of the same chains, paired."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402

from dreamrt.cli.main import main  # noqa: E402
from dreamrt.errors import UserError  # noqa: E402
from dreamrt.sim.compare import compare_runs, load_run  # noqa: E402

EVAL = ["num_chains=3", "videos=0", "progress=false", "num_workers=0", "max_steps_per_subtask=150"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for name, policy in (("expert", "policy=expert"), ("random", "policy=random")):
        assert main(["eval", policy, *EVAL, "--out", str(root / name)]) == 0
    assert main(["eval", "policy=random", "mode=tasks", "tasks=[turn_on_led]", "episodes_per_task=2",
                 *EVAL[1:], "--out", str(root / "tasks")]) == 0  # fmt: skip
    return root


def _chains(run_dir) -> list[int]:
    return [c["num_success"] for c in json.loads((run_dir / "results.json").read_text())["chains"]]


def test_compare_pairs_two_evaluations_chain_by_chain(runs, tmp_path, capsys):
    expert, random = _chains(runs / "expert"), _chains(runs / "random")
    assert (
        main(
            [
                "eval",
                "compare",
                str(runs / "expert"),
                str(runs / "random"),
                "--json",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    c = json.loads((tmp_path / "c.json").read_text())
    diffs = [b - a for a, b in zip(expert, random)]
    mean = sum(diffs) / 3
    assert c["episodes"] == {"common": 3, "baseline": 3, "candidate": 3} and c["metric"] == "avg_len"
    assert c["baseline_mean"] == pytest.approx(sum(expert) / 3) and c["candidate_mean"] == pytest.approx(
        sum(random) / 3
    )
    assert c["difference"] == pytest.approx(mean)
    assert c["paired_se"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3))
    assert (c["longer"], c["shorter"], c["same"]) == (
        sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), sum(d == 0 for d in diffs)
    )  # fmt: skip
    assert sum(expert) > sum(random)  # so the comparison has something to show
    # Only what was changed between the runs is listed: the policy.
    assert c["settings_changed"] == {"policy.name": ["expert", "random"]}
    assert "policy.name: 'expert' -> 'random'" in printed and "paired s.e." in printed
    # SR1..SR5 and per task, the rates the evaluation itself reported.
    for side, run_dir in (("baseline", runs / "expert"), ("candidate", runs / "random")):
        reported = json.loads((run_dir / "results.json").read_text())
        assert c[f"{side}_sr"] == pytest.approx(reported["sr"])
        reported = reported["per_task"]
        rows = {t: r for t, r in c["per_task"].items() if r[f"{side}_attempts"]}
        assert {t: r[f"{side}_successes"] / r[f"{side}_attempts"] for t, r in rows.items()} == pytest.approx(
            reported
        )


def test_compare_reads_results_json_and_runs_still_going(runs, tmp_path):
    whole = compare_runs(load_run(runs / "expert"), load_run(runs / "random"))
    from_results = compare_runs(load_run(runs / "expert" / "results.json"), load_run(runs / "random"))
    assert from_results["settings_changed"] is None  # results.json does not keep them
    for key in ("difference", "paired_se", "per_task", "episodes"):
        assert from_results[key] == whole[key], key

    # A run that has finished two of its episodes (its log so far) pairs on those two.
    going = tmp_path / "going"
    going.mkdir()
    lines = (runs / "random" / "episodes.jsonl").read_text().splitlines(keepends=True)
    (going / "episodes.jsonl").write_text("".join(lines[:3]))
    partial = compare_runs(load_run(runs / "expert"), load_run(going))
    finished = sorted(json.loads(line)["index"] for line in lines[1:3])
    assert partial["episodes"] == {"common": 2, "baseline": 3, "candidate": 2}
    expert = _chains(runs / "expert")
    assert partial["baseline_mean"] == pytest.approx(sum(expert[i] for i in finished) / 2)

    # Single-task runs pair the same way; their metric is the success rate.
    single = compare_runs(load_run(runs / "tasks"), load_run(runs / "tasks"))
    assert single["metric"] == "success" and single["difference"] == 0 and single["same"] == 2


def test_compare_refuses_runs_of_other_episodes_and_what_is_not_an_evaluation(runs, tmp_path, capsys):
    other = tmp_path / "seed1"
    assert main(["eval", "policy=random", "seed=1", *EVAL, "--out", str(other)]) == 0
    with pytest.raises(UserError, match="did not play the same episodes"):
        compare_runs(load_run(runs / "random"), load_run(other))
    with pytest.raises(UserError, match="no finished episode in common"):
        compare_runs(load_run(runs / "random"), load_run(runs / "tasks"))
    with pytest.raises(UserError, match="compare its episodes.jsonl"):
        load_run(runs / "tasks" / "results.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds neither"):
        load_run(tmp_path / "empty")
    (tmp_path / "notes.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="no per-chain results"):
        load_run(tmp_path / "notes.json")
    # Through the CLI: one paragraph, exit code 2.
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "missing"), str(runs / "random")]) == 2
    assert "does not exist" in " ".join(capsys.readouterr().err.split())
    assert main(["eval", "compare", str(runs / "random")]) == 2  # the candidate is missing
    assert main(["eval", "compare", str(runs / "random"), str(runs / "random"), "show_tasks=-1"]) == 2
