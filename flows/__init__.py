"""Orchestration only: which tasks, in what order, with what caching."""
