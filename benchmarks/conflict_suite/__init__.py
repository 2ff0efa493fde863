"""Task-conflict quality suite: equal-parameter adapters on a mixture of conflicting synthetic tasks.

``python benchmarks/conflict_suite/run.py [--check|--quick|--full]``; see ``run.py``.
"""
