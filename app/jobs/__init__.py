"""Training jobs: schemas, the service (submit, cancel, follow), one lifecycle for both
runners (``local``: processes of this server; ``celery_runner`` + ``tasks``: Celery
workers), the job body that trains, and the event fan-out."""
