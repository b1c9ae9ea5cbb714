"""Evaluation: the attack suite against each defense configuration, and the paper's tables.

    guardian evaluate --config benchmarks/attacks_mnist.yaml --out benchmarks/results/attacks_mnist
"""

from guardian_plugin.evaluation.config import CONFIGURATIONS, EvalConfig, load_eval_config  # noqa: F401
