"""ftkit's measurement lab: memory planner, ablation grid, LoRA comparison and benchmarks.

The training path never imports this package; the lab drives it from outside, in fresh
processes, exactly as users run it.
"""
