"""The public job contract: the job models, the wire envelope, phone numbers, and the producer."""
