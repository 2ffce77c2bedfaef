"""The send path: the send_message actor, its steps (admit, claim, call, record), the ledger."""
