"""The demo workload behind `idla train`, the benchmarks, the examples and the tests."""

from idla.demo.data import accuracy, load_digits_split, load_digits_tensors
from idla.demo.models import MLP, DigitsCNN

__all__ = ["MLP", "DigitsCNN", "accuracy", "load_digits_split", "load_digits_tensors"]
