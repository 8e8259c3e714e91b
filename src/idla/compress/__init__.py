"""Gradient compression: stateless codecs, and error feedback that carries what they drop.

``parse_codec("topk:0.01")`` builds a codec; the sync layer moves its payloads with the
collective its ``transport`` names, and ``ErrorFeedback`` adds each tensor's residual from
the previous step before compressing.
"""

from idla.compress.codecs import (
    Codec,
    Fp16,
    NoCompression,
    PowerSGD,
    RandomK,
    ScaledSign,
    TopK,
    Transport,
    parse_codec,
)
from idla.compress.error_feedback import ErrorFeedback
from idla.compress.packing import pack, unpack

__all__ = [
    "Codec",
    "ErrorFeedback",
    "Fp16",
    "NoCompression",
    "PowerSGD",
    "RandomK",
    "ScaledSign",
    "TopK",
    "Transport",
    "pack",
    "parse_codec",
    "unpack",
]
