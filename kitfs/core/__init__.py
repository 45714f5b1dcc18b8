"""Where registry and cache meet: lazy verified reads and the ModelKit session."""
