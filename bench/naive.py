"""The baseline: a naive dramatiq actor that just posts to Verloop with httpx.

No validation, no token lookup, no classification, no log line: what a first draft of this
worker would be. It reads its settings from the environment at import, as such drafts do;
``bench/send_path.py`` and ``bench/high_rate.py`` set them.
"""

from __future__ import annotations

import os

import dramatiq
import httpx
from dramatiq.brokers.rabbitmq import RabbitmqBroker

QUEUE = "bench.naive"

broker = RabbitmqBroker(url=os.environ["BENCH_AMQP_URL"])
dramatiq.set_broker(broker)
_client = httpx.Client(base_url=os.environ["BENCH_VERLOOP_URL"], timeout=15)
_token = os.environ["BENCH_PHONE_TOKEN"]


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def naive_send(to: str, text: str) -> None:
    """POST one text message."""
    body = {"messaging_product": "whatsapp", "to": to, "type": "text", "text": {"body": text}}
    response = _client.post(
        "/api/v2/whatsapp/send_message", json=body, headers={"Authorization": _token}
    )
    response.raise_for_status()
