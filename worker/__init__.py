"""verloop-worker: WhatsApp messages sent through Verloop, from jobs on RabbitMQ, by dramatiq.

Folders by role (README.md's "Layout" lists every module):

- ``jobs/``           the public contract: job models, phone numbers, the producer API
- ``send/``           the send path: the actors, the rate-limit gate, the idempotency ledger
- ``finish/``         finishing a job: log line, retry or dead letter, outcome events, outbox
- ``verloop/``        Verloop's API: endpoint table, HTTP client, failure classes, tokens
- ``limits/``         each number's rate limit, shared by the fleet through Redis
- ``campaigns/``      one template to many recipients: file, enqueue, state, send windows
- ``dlq/``            dead-letter tooling: read, replay, purge, export
- ``connections/``    Redis and AMQP connections, Redis keys
- ``runtime/``        a worker process: app, broker, services, supervisor, lifeline, health
- ``commands/``       every ``verloop-worker`` command: options and printing
- ``observability/``  logging and metrics
- ``sandbox/``        the Verloop simulator
- ``settings.py``, ``errors.py``, ``bounded.py``: settings, errors, LRU dict, used everywhere

Start reading at :mod:`worker.send.actors`: a job's path, step by step, top to bottom.
"""
