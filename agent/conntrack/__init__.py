"""Connection tracking, the agent side (see model.py, gc.py, purge.py, migrate.py)."""
