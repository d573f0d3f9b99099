"""Adapters between the core and the outside world (MLflow, Great Expectations, queues).

Each knows nothing of Prefect; each optional dependency is imported only by its own module.
"""
