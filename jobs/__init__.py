"""The ML work itself: model zoo, datasets, training loop. Plain torch.

Nothing here imports Ray, MLflow or the scheduler: the training loop reports
through the :class:`jobs.context.JobContext` it is handed.
"""
