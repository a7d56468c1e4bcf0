"""The OpenAI-compatible gateway: live clients in front of the same serving core.

``app`` holds the HTTP routes (Starlette), ``exchange`` one client request's trip to
vLLM and back, ``admission`` the 429 decisions, ``metrics`` the Prometheus page,
``server`` the process that runs the core's loop and uvicorn in one event loop.
"""
