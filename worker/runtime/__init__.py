"""A worker process: the broker, its middleware, its long-lived services, health and supervision."""
