"""idla: an intelligent deep-learning agent for heterogeneous devices.

The public API is small: `Agent` (and its `AgentConfig`) for a user's own training script, and
`run_elastic` (with `ElasticState`, `ElasticConfig`) for one that survives lost workers.
"""

from idla.agent import Agent, AgentConfig
from idla.errors import IdlaError
from idla.runtime.elastic import ElasticConfig, ElasticState, run_elastic

__all__ = ["Agent", "AgentConfig", "ElasticConfig", "ElasticState", "IdlaError", "run_elastic"]
__version__ = "0.1.0"
