"""Finishing a job: its outcome, retry or dead letter, ledger record, campaign count and event."""
