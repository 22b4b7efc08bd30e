"""The intake: a validated send taken through its checks and into the queue.

The routes (``api/routes/email.py``, ``api/routes/batch.py``) read the HTTP
request and
answer it; everything between is here, one module per part:

- :mod:`postroom.api.intake.pipeline` — the one path of a send: in one step when it can, else its
  checks, then the queue; a keyed send; a batch;
- :mod:`postroom.api.intake.checks` — what a send must pass (caller, solution, ``from``, relay,
  suppressions, hLimit), read from Redis in one round trip;
- :mod:`postroom.api.intake.job` — the job built from a send and its solution;
- :mod:`postroom.api.intake.queueing` — the job, its first document and its accepted-set entry
  written, and the job published (or scheduled);
- :mod:`postroom.api.intake.one_step` — the checks and the queueing in one script, for a solution
  this process has seen pass;
- :mod:`postroom.api.intake.idempotency` — ``Idempotency-Key`` (a batch message's
  ``idempotency_key``): the same key and body within 24 h is the same task.
"""
