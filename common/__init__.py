"""Code shared by the broker, the worker and agents: wire protocol, config, client."""
