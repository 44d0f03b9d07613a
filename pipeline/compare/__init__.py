"""`one-pipeline compare` and what it is made of: the runs (runs.py), the paired and Welch's tests
(significance.py), the deploy cost (cost.py), compare.json and its entry point (summary.py), compare.md and
its plots (report.py), `compare --compress` (compress.py) and several compares in one table and plot
(gain_map.py, `one-pipeline gain-map`)."""

from pipeline.compare.runs import Method, methods, parse_seeds, run_config
from pipeline.compare.significance import SIGNIFICANCE, gain, paired, welch
from pipeline.compare.summary import COMPARE_VERSION, CompareResult, compare, recipe, summarise

__all__ = ["COMPARE_VERSION", "SIGNIFICANCE", "CompareResult", "Method", "compare", "gain", "methods", "paired",
           "parse_seeds", "recipe", "run_config", "summarise", "welch"]
