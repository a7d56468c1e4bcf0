"""qlmctl: queue management that keeps LLM latency SLOs under load."""

__version__ = "0.1.0"
