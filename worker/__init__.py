"""verloop-worker: WhatsApp messages sent through Verloop, from jobs on RabbitMQ, by dramatiq.

Folders by role (README.md's "Layout" lists every module):

- ``jobs/``           the public contract: models, JSON limits, registry, wire, phones, producer
- ``send/``           the send path: the send_message handler, its steps, the gate, the ledger
- ``finish/``         finishing a job: typed outcome, log line, retry or dead letter, events
- ``receipts/``       delivery receipts: a sent message's statuses, once each, in any order
- ``webhooks/``       the status webhook receiver: signed webhooks in, confirmed status jobs out
- ``verloop/``        Verloop's API: endpoints, HTTP client, failure classes, tokens, handlers
- ``limits/``         each number's rate limit, shared by the fleet through Redis
- ``campaigns/``      one template to many recipients: file, enqueue, state, send windows
- ``dlq/``            dead-letter tooling: read, replay, purge, export
- ``connections/``    Redis and AMQP connections, queue arguments, Redis keys
- ``runtime/``        a worker process: app, broker, actors, services, supervisor, health
- ``commands/``       every ``verloop-worker`` command: options and printing
- ``observability/``  logging and metrics
- ``sandbox/``        the Verloop simulator
- ``settings.py``, ``errors.py``, ``bounded.py``: settings, errors, LRU dict, used everywhere

Start reading at :mod:`worker.send.actor`: the send_message handler, top to bottom.
"""
