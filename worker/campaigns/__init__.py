"""Campaigns: one template to many recipients, enqueued from a file, paced, pausable."""
