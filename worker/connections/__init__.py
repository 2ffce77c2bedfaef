"""Connections to Redis and RabbitMQ: opening them, per-thread Redis calls, keys, errors."""
