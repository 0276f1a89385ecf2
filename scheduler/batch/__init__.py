"""The batch lane: the job store, the reconcile loop that drives jobs, the job service."""
