"""Talking to Verloop: the endpoint table, the HTTP client, error classification, tokens."""
