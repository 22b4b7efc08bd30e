"""postroom: a self-hosted, queue-backed email service.

``postroom.api`` is the HTTP intake, ``postroom.worker`` the Celery workers that deliver,
``postroom.shared`` what both use; ``postroom.cli`` is the ``postroom`` command and
``postroom.dev`` the one-command development stack it runs.
"""
