"""idla: an intelligent deep-learning agent for heterogeneous devices.

The public API is small: `Agent` (and its `AgentConfig`) for a user's own training script.
"""

from idla.agent import Agent, AgentConfig
from idla.errors import IdlaError

__all__ = ["Agent", "AgentConfig", "IdlaError"]
__version__ = "0.1.0"
