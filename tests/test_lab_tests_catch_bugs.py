"""The lab tests can fail: classic student bugs lose points, and on the exercise they are in.

Each case takes one exercise from its solution source (``solutions/labNN_*.py``),
plants a classic bug with a one-line edit (the edit must apply, so the case
follows the solution), and runs the lab's own test functions in this process
against the result -- no notebook, no grader child: seconds, not minutes.
The same functions run against the unedited solution first, which must pass
them all (the runner works, and the bug is what fails).

Tests that need more than ``impl`` (the tiny model fixtures) are left out
here; the grading runs of ``tests/test_labs_pipeline.py`` cover them.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import itertools
import types
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LAB_TESTS = REPO_ROOT / "tests" / "labs"


def solution_namespace(lab: str, names: list[str],
                       edit: tuple[str, str] | None = None) -> types.SimpleNamespace:
    """The solution's imports and its definitions ``names``, with ``edit`` (old, new) applied
    once to their source. Nothing else of the solution runs (no model is loaded)."""
    (path,) = sorted((REPO_ROOT / "solutions").glob(f"lab{lab}_*.py"))
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    kept = [node for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom))
            or (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names)]
    assert {node.name for node in kept if hasattr(node, "name")} == set(names)
    code = "\n\n".join(ast.get_source_segment(source, node) for node in kept)
    if edit is not None:
        old, new = edit
        assert code.count(old) == 1, f"the bug's edit no longer applies to {path.name}: {old!r}"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, f"<{path.name} {'buggy' if edit else 'as written'}>", "exec"), namespace)
    return types.SimpleNamespace(**{name: namespace[name] for name in names})


def lab_tests(lab: str) -> types.ModuleType:
    """``tests/labs/test_labNN.py`` imported under a private name."""
    spec = importlib.util.spec_from_file_location(f"lab_tests_catch_{lab}",
                                                  LAB_TESTS / f"test_lab{lab}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Case:
    name: str  # test_x[params]
    exercise: str | None
    points: float
    passed: bool


def run_lab_tests(module: types.ModuleType, impl: object, only: set[str] | None = None) -> list[Case]:
    """Every ``impl``-only test of ``module`` (each parametrized case), as the grader scores them."""
    cases = []
    for name, function in vars(module).items():
        if not name.startswith("test_") or not inspect.isfunction(function):
            continue
        if only is not None and name not in only:
            continue
        marks = {mark.name: mark for mark in getattr(function, "pytestmark", []) if mark.name != "parametrize"}
        grids = [mark for mark in getattr(function, "pytestmark", []) if mark.name == "parametrize"]
        argnames = [[n.strip() for n in (g.args[0].split(",") if isinstance(g.args[0], str) else g.args[0])]
                    for g in grids]
        if set(inspect.signature(function).parameters) - {"impl"} - {n for ns in argnames for n in ns}:
            continue  # needs a fixture (the tiny model): graded by the pipeline tests
        exercise = marks["exercise"].args[0] if "exercise" in marks else None
        points = float(marks["points"].args[0]) if "points" in marks else 1.0
        for combo in itertools.product(*[g.args[1] for g in grids]):
            kwargs, ids = {}, []
            for names, values in zip(argnames, combo):
                values = values if len(names) > 1 else (values,)
                kwargs.update(zip(names, values))
                ids.append("-".join(map(str, values)))
            try:
                function(impl, **kwargs)
                passed = True
            except Exception:  # noqa: BLE001 - a failed assertion or a crash both fail the test
                passed = False
            cases.append(Case(name + (f"[{'-'.join(ids)}]" if ids else ""), exercise, points, passed))
    assert cases, f"no impl-only tests in {module.__name__}"
    return cases


def lost(cases: list[Case]) -> dict[str, float]:
    """Points lost per exercise."""
    out: dict[str, float] = {}
    for case in cases:
        if not case.passed:
            out[case.exercise or "-"] = out.get(case.exercise or "-", 0.0) + case.points
    return out


def failed(cases: list[Case]) -> set[str]:
    return {case.name.partition("[")[0] for case in cases if not case.passed}


# ---------------------------------------------------------------- lab 01: top-p keeps one too few
SAMPLER = ["apply_top_k", "apply_top_p", "sample_next_token"]
TOP_P_KEEPS_ONE_TOO_FEW = ("mass_before = torch.cumsum(probs, dim=-1) - probs",
                           "mass_before = torch.cumsum(probs, dim=-1)")  # drops the token crossing p


def test_lab01_sampler_as_written_passes() -> None:
    cases = run_lab_tests(lab_tests("01"), solution_namespace("01", SAMPLER))
    assert not lost(cases), failed(cases)


def test_lab01_top_p_that_keeps_one_too_few_fails_test_top_p() -> None:
    buggy = solution_namespace("01", SAMPLER, TOP_P_KEEPS_ONE_TOO_FEW)
    cases = run_lab_tests(lab_tests("01"), buggy, only={"test_top_p"})
    failing = sorted(case.name for case in cases if not case.passed)
    # every p < 1: before, one token off per row was tolerated and only p=0.05 failed
    assert failing == ["test_top_p[0.05]", "test_top_p[0.3]", "test_top_p[0.75]", "test_top_p[0.95]"]


# ---------------------------------------------------------------- lab 03: each test on its own exercise
ALLOCATOR = ["slot_mapping", "BlockAllocator", "gather_context", "prefix_block_hashes"]  # every exercise
ALLOCATE_LEAKS_ON_REFUSAL = (  # takes blocks one by one and gives up half-way, keeping them
    "        if need > self.num_free:\n            return None\n"
    "        self.tables[seq_id] = [self._take() for _ in range(need)]\n",
    "        table = []\n        for _ in range(need):\n"
    "            if not self.free_blocks:\n                return None\n"
    "            table.append(self._take())\n        self.tables[seq_id] = table\n")
APPEND_WRITES_INTO_SHARED_BLOCK = (  # no copy-on-write after a fork
    "elif self.ref_counts[table[-1]] > 1:", "elif False:")


def test_lab03_allocator_as_written_passes() -> None:
    cases = run_lab_tests(lab_tests("03"), solution_namespace("03", ALLOCATOR))
    assert not lost(cases), failed(cases)


def test_lab03_allocate_bug_is_charged_to_allocate_not_fork() -> None:
    cases = run_lab_tests(lab_tests("03"), solution_namespace("03", ALLOCATOR, ALLOCATE_LEAKS_ON_REFUSAL))
    charged = lost(cases)
    assert charged.get("allocate", 0) > 0, failed(cases)
    assert set(charged) <= {"allocate", "BlockAllocator"}, charged


def test_lab03_copy_on_write_bug_is_charged_to_append_slot_not_fork() -> None:
    cases = run_lab_tests(lab_tests("03"),
                          solution_namespace("03", ALLOCATOR, APPEND_WRITES_INTO_SHARED_BLOCK))
    charged = lost(cases)
    assert charged.get("append_slot", 0) > 0, failed(cases)
    assert set(charged) <= {"append_slot", "BlockAllocator"}, charged


# ---------------------------------------------------------------- lab 04: the budget boundary
SCHEDULER = ["schedule", "build_batch"]
BUDGET_OFF_BY_ONE = ("if req.num_tokens > budget:", "if req.num_tokens >= budget:")


def test_lab04_scheduler_as_written_passes() -> None:
    cases = run_lab_tests(lab_tests("04"), solution_namespace("04", SCHEDULER))
    assert not lost(cases), failed(cases)


def test_lab04_budget_off_by_one_fails_the_boundary_test() -> None:
    cases = run_lab_tests(lab_tests("04"), solution_namespace("04", SCHEDULER, BUDGET_OFF_BY_ONE))
    assert "test_a_prompt_of_exactly_the_budget_is_admitted" in failed(cases)
    assert set(lost(cases)) == {"schedule"}



# ---------------------------------------------------------------- lab 13: tensor parallelism
TP = ["kv_bytes_per_token", "_check_range", "ColumnParallelLinear", "RowParallelLinear", "partition",
      "shard_checkpoint", "tp_comm_bytes_per_token", "fifo_latencies"]
BIAS_BEFORE_ALL_REDUCE = (  # every rank adds the bias, then the sum counts it twice
    "y = F.linear(x, self.weight)                 # this rank's partial product, full output size\n"
    "        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)\n"
    "        return y if self.bias is None else y + self.bias",
    "y = F.linear(x, self.weight, self.bias)\n"
    "        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)\n"
    "        return y")
ALL_REDUCE_OVER_THE_WORLD = ("op=dist.ReduceOp.SUM, group=self.group)", "op=dist.ReduceOp.SUM)")
REMAINDER_DROPPED = ("start + base + (1 if tp_rank < extra else 0))", "start + base)")
QUERY_HEADS_SPLIT_EVENLY = (  # ignores the KV groups: query heads 0-4 / 5-8 at 9/3 heads, TP=2
    "q_rows = range(kv.start * group * head_dim, kv.stop * group * head_dim)",
    "q_rows = range(partition(num_heads, tp_rank, tp_size).start * head_dim, "
    "partition(num_heads, tp_rank, tp_size).stop * head_dim)")
ONE_ALL_REDUCE_PER_LAYER = ("return num_layers * 2 * (2 * (tp_size - 1) / tp_size) * message",
                            "return num_layers * (2 * (tp_size - 1) / tp_size) * message")
NO_QUEUEING = ("start = max(arrivals[i], free_at)", "start = arrivals[i]")




def exercise_tests(module, exercise: str) -> set[str]:
    """The names of the tests of ``module`` marked ``@pytest.mark.exercise(exercise)``."""
    return {name for name, f in vars(module).items() if name.startswith("test_") and any(
        m.name == "exercise" and m.args[0] == exercise for m in getattr(f, "pytestmark", []))}


def test_lab13_as_written_passes_the_in_process_tests() -> None:
    """The runner works on this lab (every test, the gloo ones too, passes in tests/labs/test_lab13.py[solution])."""
    module = lab_tests("13")
    only = set().union(*(exercise_tests(module, e) for e in ("partition", "tp_comm_bytes_per_token", "fifo_latencies",
                                                       "ColumnParallelLinear")))
    cases = run_lab_tests(module, solution_namespace("13", TP), only=only)
    assert len(cases) >= 8 and not lost(cases), failed(cases)


def test_lab13_bugs_fail_their_exercise_tests() -> None:
    """Each bug against the tests of its own exercise only (the gloo tests fork: this keeps it to seconds)."""
    module = lab_tests("13")
    for edit, exercise in [(BIAS_BEFORE_ALL_REDUCE, "RowParallelLinear"),
                           (ALL_REDUCE_OVER_THE_WORLD, "RowParallelLinear"),
                           (REMAINDER_DROPPED, "partition"),
                           (QUERY_HEADS_SPLIT_EVENLY, "shard_checkpoint"),
                           (ONE_ALL_REDUCE_PER_LAYER, "tp_comm_bytes_per_token"),
                           (NO_QUEUEING, "fifo_latencies")]:
        cases = run_lab_tests(module, solution_namespace("13", TP, edit), only=exercise_tests(module, exercise))
        assert lost(cases).get(exercise, 0) > 0, (edit, failed(cases))


# ---------------------------------------------------------------- lab 14: routing over replicas, migration
LAB14 = ["freeness", "pick_least_loaded", "plan_copy_round", "simulate_migration"]
FREE_BLOCKS_ONLY = ("return (report.free_blocks - report.queued_demand_blocks) / (report.running + 1)",
                    "return report.free_blocks / (report.running + 1)")
NEWCOMER_NOT_COUNTED = ("/ (report.running + 1)", "/ max(1, report.running)")
NO_TIE_BREAK_BY_REQUESTS = ("loads[i].running + loads[i].waiting, i))", "i))")
LEAST_FREE_BLOCKS = ("key=lambda i: (-freeness(loads[i]),", "key=lambda i: (-loads[i].free_blocks,")
PARTIAL_BLOCK_COPIED_EARLY = ("return list(range(num_copied_blocks, num_full)), False",
                              "return list(range(num_copied_blocks, num_blocks)), False")
STOPS_ONE_ROUND_LATE = ("num_blocks - num_copied_blocks <= stop_threshold_blocks",
                        "num_blocks - num_copied_blocks < stop_threshold_blocks")
NO_DECODING_DURING_A_ROUND = ("progress += took / seconds_per_token", "progress += 0")


def test_lab14_as_written_passes_its_tests() -> None:
    cases = run_lab_tests(lab_tests("14"), solution_namespace("14", LAB14))
    assert len(cases) >= 11 and not lost(cases), failed(cases)


def test_lab14_bugs_fail_their_exercise_tests() -> None:
    module = lab_tests("14")
    for edit, exercise in [(FREE_BLOCKS_ONLY, "freeness"), (NEWCOMER_NOT_COUNTED, "freeness"),
                           (NO_TIE_BREAK_BY_REQUESTS, "pick_least_loaded"), (LEAST_FREE_BLOCKS, "pick_least_loaded"),
                           (PARTIAL_BLOCK_COPIED_EARLY, "plan_copy_round"), (STOPS_ONE_ROUND_LATE, "plan_copy_round"),
                           (NO_DECODING_DURING_A_ROUND, "simulate_migration")]:
        cases = run_lab_tests(module, solution_namespace("14", LAB14, edit), only=exercise_tests(module, exercise))
        assert lost(cases).get(exercise, 0) > 0, (edit, failed(cases))


# ---------------------------------------------------------------- lab 16: compound AI
COMPOUND = ["canonical_prompt", "ready_set"]
RETRIEVAL_ORDER_KEPT = ("for pid in sorted(set(retrieved)):", "for pid in dict.fromkeys(retrieved):")
NO_BLOCK_PADDING = ("return list(ids) + [pad_id] * (-len(ids) % block_size)", "return list(ids)")
STARTS_BEFORE_ALL_INPUTS = ("all(d in done for d in ds)", "any(d in done for d in ds) or not ds")
STARTS_TWICE = ("if n not in started and all(", "if all(")


def test_lab16_as_written_passes() -> None:
    cases = run_lab_tests(lab_tests("16"), solution_namespace("16", COMPOUND))
    assert len(cases) >= 10 and not lost(cases), failed(cases)


def test_lab16_bugs_fail_their_exercise_tests() -> None:
    module = lab_tests("16")
    for edit, exercise in [(RETRIEVAL_ORDER_KEPT, "canonical_prompt"), (NO_BLOCK_PADDING, "canonical_prompt"),
                           (STARTS_BEFORE_ALL_INPUTS, "ready_set"), (STARTS_TWICE, "ready_set")]:
        cases = run_lab_tests(module, solution_namespace("16", COMPOUND, edit))
        charged = lost(cases)
        assert charged.get(exercise, 0) > 0, (edit, failed(cases))
        assert set(charged) == {exercise}, (edit, charged)
