"""The floor a user's script touches: `Agent` and its config, elastic runs, resume."""

from idla.agent.agent import Agent
from idla.agent.config import AgentConfig
from idla.agent.elastic import ElasticReport, ElasticState, run_elastic
from idla.agent.lifecycle import AgentNotClosedWarning
from idla.agent.replicas import parameter_digest
from idla.agent.resume import restore_agent, save_agent

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentNotClosedWarning",
    "ElasticReport",
    "ElasticState",
    "parameter_digest",
    "restore_agent",
    "run_elastic",
    "save_agent",
]
