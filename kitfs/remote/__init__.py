"""Talking to OCI registries: HTTP, auth, retries. Knows nothing of the cache."""
