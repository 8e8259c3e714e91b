"""Errors a user can cause; the CLI prints them as one line and exits non-zero."""


class IdlaError(Exception):
    """A mistake in the user's input or environment, reported without a traceback."""


class ConfigError(IdlaError, ValueError):
    """A configuration value is invalid; the message names the field."""


class PlanError(IdlaError, ValueError):
    """No allocation satisfies the constraints (e.g. memory caps cannot hold the global batch)."""


class EmulationError(IdlaError, RuntimeError):
    """Heterogeneity emulation (cgroups, namespaces) is not available here."""


class ReplicaMismatchError(IdlaError, RuntimeError):
    """Replicas diverged: parameter hashes differ across ranks."""


class GradientError(IdlaError, RuntimeError):
    """A gradient the exchange cannot make exact (a foreign ``.grad`` with values in it, a
    sparse gradient, ranks that disagree on which parameters train); the message names it."""
