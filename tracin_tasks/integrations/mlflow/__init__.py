"""MLflow: reading a run for an audit (``source``), logging a run for one (``logging``), and logging
an audit's result next to the run (``report``). See ``source.py`` for how the parts fit."""
