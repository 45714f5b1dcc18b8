"""The local content-addressed cache: SQLite metadata and chunk files. Knows nothing of registries."""
