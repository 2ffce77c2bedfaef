"""The status webhook receiver (``verloop-worker webhooks``): WhatsApp's signed status and
inbound-message webhooks in, confirmed ``record_statuses`` jobs and ``inbound.message`` events
out. :mod:`worker.webhooks.server` is the HTTP side; start reading there."""
