"""Evaluation of generated programs: a sandboxed runner for untrusted code, the unbiased pass@k estimator, and
HumanEval checked through both. Generated code never runs in the calling process (server or trainer).

    from deepseek.evaluation import evaluate, load_problems, run_python
    from deepseek.evaluation import evaluate_model  # sample a model through the batched engine, then the above
"""

from deepseek.evaluation.codegen import CodegenReport, evaluate_model, sample_completions, truncate
from deepseek.evaluation.humaneval import EvalReport, check_completion, evaluate, load_problems, program
from deepseek.evaluation.passk import mean_pass_at_k, pass_at_k
from deepseek.evaluation.sandbox import ExecutionResult, run_python

__all__ = ["CodegenReport", "EvalReport", "ExecutionResult", "check_completion", "evaluate", "evaluate_model",
           "load_problems", "mean_pass_at_k", "pass_at_k", "program", "run_python", "sample_completions", "truncate"]
