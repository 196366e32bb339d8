"""``vrmoe eval``: probes of calibration, OOD detection, routing stability and cost of a run.

``run`` (``evaluate_run`` and the command line), ``context`` (what the probes share),
``probes/`` (one module per probe) and ``schema`` (the eval.json layout and its readers).
Nothing is imported here, so reading eval.json (``schema``) costs no torch import.
"""
