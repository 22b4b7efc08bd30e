"""The Celery workers: take a token, send over SMTP, record the outcome."""
