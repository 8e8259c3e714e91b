"""Gradient compression: stateless codecs, and error feedback that carries what they drop.

``parse_codec("topk:0.01")`` builds a codec; the sync layer moves its payloads with the
collective its ``transport`` names, and ``ErrorFeedback`` adds each tensor's residual from
the previous step before compressing.
"""

from idla.compress.base import Codec, Transport, compresses
from idla.compress.codecs import Fp16, NoCompression, RandomK, ScaledSign, TopK, parse_codec
from idla.compress.error_feedback import ErrorFeedback
from idla.compress.packing import pack, unpack
from idla.compress.powersgd import PowerSGD

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
    "compresses",
    "pack",
    "parse_codec",
    "unpack",
]
