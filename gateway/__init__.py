"""lmx.gateway: an OpenAI-compatible HTTP gateway in front of the broker (`lmx-gateway`)."""
