"""Serving: the event-driven core, its two drivers, serving operations and the run log."""
