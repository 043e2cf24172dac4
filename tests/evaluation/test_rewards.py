"""The code rewards GRPO scores with: parses (ast, in process), doctests (sandbox only), length."""

import pytest

from deepseek.evaluation.rewards import doctests_rewards, is_code_prompt, length_reward, parses_reward

DOUBLE = {"prompt": 'def double(x):\n    """\n    >>> double(2)\n    4\n    """\n', "doctests": ">>> double(2)\n4\n",
          "entry_point": "double", "module": "string"}


def test_parses_reads_prompt_and_completion_of_a_code_prompt_and_the_completion_alone_otherwise():
    assert is_code_prompt(DOUBLE) and not is_code_prompt({"prompt": "say hi"})
    assert parses_reward(DOUBLE, "    return 2 * x\n") == 1.0
    assert parses_reward(DOUBLE, "    return 2 *\n") == 0.0
    assert parses_reward({"prompt": "def f(:"}, "x = 1") == 1.0  # a plain prompt: only the completion counts
    assert parses_reward({"prompt": "p"}, "x = (") == 0.0
    assert parses_reward({"prompt": "p"}, "x = '\0'\0") == 0.0  # a NUL byte is no crash


def test_parses_needs_a_body_besides_the_docstring_of_a_code_prompt():
    # the prompt (def line + docstring) parses alone: an empty completion must not earn the reward
    assert parses_reward(DOUBLE, "") == 0.0
    assert parses_reward(DOUBLE, "\n\n") == 0.0
    assert parses_reward(DOUBLE, "    pass\n") == 1.0
    assert parses_reward(DOUBLE, "\ndef other():\n    return 1\n") == 0.0  # another function's body is not its


def test_doctests_pass_only_for_a_correct_body_and_run_in_the_sandbox():
    rows = [DOUBLE, DOUBLE, DOUBLE, {"prompt": "no doctests"}]
    completions = ["    return 2 * x\n", "    return x + 1\n",
                   "    import os; open('/proc/self/status').read(); return 2 * x\n", "anything"]
    assert doctests_rewards(rows, completions) == [1.0, 0.0, 1.0, 0.0]


def test_exiting_early_with_status_zero_earns_nothing():
    """os._exit(0) inside the function would pass an exit-status check; in process it would end pytest."""
    assert doctests_rewards([DOUBLE], ["    import os\n    os._exit(0)\n"]) == [0.0]


def test_an_infinite_loop_is_a_zero_reward_at_the_timeout():
    assert doctests_rewards([DOUBLE], ["    while True:\n        pass\n"], timeout_s=1.0) == [0.0]


@pytest.mark.parametrize("tokens, reward", [(0, 1.0), (16, 0.5), (32, 0.0), (40, 0.0)])
def test_length_reward(tokens, reward):
    assert length_reward(tokens, 32) == reward
