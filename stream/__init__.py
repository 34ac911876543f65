"""driftline.stream: the drift detector service (events, engine, state, agents, CLI)."""

__version__ = "0.1.0"
