"""The contract between the control plane and the workers: the only part of ``workers/``
that ``scheduler/`` imports (``scheduler/wiring.py`` aside, which builds the adapters).

Values and protocols, no behaviour that touches Ray, MLflow, NVML or torch:
``errors`` (the one error tree), ``telemetry`` (GPU readings), ``spec`` (the
training config a user submits, the same typed value from the API to the job
process), ``executor`` (launching and watching training workers),
``replicas`` (launching and watching inference replicas), ``history`` (what the
tracking server knows about finished runs: peak GPU memory, steps per second).
"""
