"""One unit of work per module: plain functions that the flows wrap as Prefect tasks."""
