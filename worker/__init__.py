"""The GPU worker: model loading, generation engine, Celery tasks."""
