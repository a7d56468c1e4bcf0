"""Profiles: the fitted performance model per (model, GPU type), how it is measured and stored."""
