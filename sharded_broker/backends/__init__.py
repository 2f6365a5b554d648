"""Storage backends: memory (the reference model), SQLite and Redis."""
