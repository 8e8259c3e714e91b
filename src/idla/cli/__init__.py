"""The command line: `idla train | profile | bench | fl | serve | infer`."""

from idla.cli.app import main

__all__ = ["main"]
