"""Everything of postroom that depends on Celery's message format or kombu's internals.

Written for Celery 5.7, kombu 5.7 and py-amqp 5.4.2 (the ranges in ``pyproject.toml``:
``celery>=5.7,<6``, ``kombu>=5.7,<6``, ``amqp>=5.4.2,<6``; ``tests/test_dependencies.py``
checks that the installed versions lie in them and that the parts reached into exist):

- :mod:`.task_message` — the task message ``postroom.send_email`` (Celery task protocol 2,
  JSON): its headers, body and properties as kombu's Redis transport stores them and as
  AMQP carries them (encode), and the job read back from a delivered or stored message
  (decode), side by side;
- :mod:`.redis_transport` — postroom's subclass of kombu's Redis transport (its channel's
  BRPOP read, client, unacked records and acknowledgements, all private to kombu);
- :mod:`.amqp_publisher` — publishing task messages to RabbitMQ with py-amqp's
  ``basic_publish`` in confirm mode, the queue declared as Celery declares it;
- :mod:`.dead_letters` — messages the worker cannot read, set aside in Redis: including
  the handlers of Celery's consumer that postroom replaces (``on_unknown_message``,
  ``on_unknown_task``, ``on_invalid_task``, ``on_decode_error``).

The task's strategy (:class:`postroom.worker.batching.BatchStrategy`, Celery's ``Task.Strategy``
hook) decodes through :func:`.task_message.decode_message`. The few other reaches into
libraries' private parts are listed in ``docs/architecture.md`` ("Library internals").
"""
