"""Delivery receipts: the statuses WhatsApp reports after a send (delivered, read, failed)."""
