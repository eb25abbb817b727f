"""Experiments: plans (a YAML grid -> resolved runs), built-in profiles, executors and the resumable runner.

`plan` (schema, validation, `expand_plan`), `executors` (local worker processes, Ray), `runner`
(`run_benchmark`: skip finished runs, run the rest in parallel, index and summary). docs/benchmark.md.
"""

from carebench.experiments.plan import Plan, PlanError, expand_plan, load_plan, parse_plan, profiles
from carebench.experiments.runner import BenchmarkSummary, print_summary, read_index, run_benchmark

__all__ = [
    "BenchmarkSummary",
    "Plan",
    "PlanError",
    "expand_plan",
    "load_plan",
    "parse_plan",
    "print_summary",
    "profiles",
    "read_index",
    "run_benchmark",
]
