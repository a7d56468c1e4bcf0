"""Engines: what the core talks to. Real vLLM over HTTP, or a simulated vLLM in virtual time."""
