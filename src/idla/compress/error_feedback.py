"""Error feedback: what a codec dropped this step is added back before compressing the next.

With residual e (zero at first) and gradient g, each step compresses c = g + e, sends s and
keeps e' = c - s, so nothing is lost, only delayed. This makes biased codecs (top-k, unscaled
random-k, scaled sign, PowerSGD) converge like uncompressed SGD (Seide et al. 2014; Stich et
al. 2018; Karimireddy et al. 2019). Cost: one float32 buffer per compressed tensor, i.e. a
second copy of those gradients in memory (twice their bytes for a bf16 or fp16 model).

Residuals and corrected gradients are float32 whatever the gradient's dtype: a bf16 residual
would round away each new gradient entry below about 2^-9 of what has built up in it, and
under top-k an entry builds up for about 1/ratio steps before it is sent. A float64 gradient
is rounded to float32 here (relative 2^-24; that rounding is not carried over).

The caller decides what "sent" is, which lets one class serve every codec: for most codecs it
is ``codec.decompress(codec.compress(c))``, for PowerSGD the sync layer computes it after the
collectives (the rank-r approximation of its own ``c``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from idla.errors import ConfigError


class ErrorFeedback:
    """Carries what compression dropped into the next step, per tensor key."""

    def __init__(self) -> None:
        self._residuals: dict[str, torch.Tensor] = {}

    def corrected(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """A new float32 tensor ``x + residual[key]`` (a float32 copy of ``x`` while ``key`` has
        no residual), whatever ``x``'s floating dtype.

        A residual loaded on another device (e.g. the CPU, from a checkpoint) moves to
        ``x``'s device here, once.

        Raises:
            ValueError: If the residual's shape differs from ``x``'s.
        """
        residual = self._residuals.get(key)
        if residual is None:
            return x.detach().to(torch.float32, copy=True)
        if residual.shape != x.shape:
            raise ValueError(
                f"error feedback {key!r}: residual shape {tuple(residual.shape)} "
                f"differs from tensor shape {tuple(x.shape)}"
            )
        if residual.device != x.device:
            residual = self._residuals[key] = residual.to(x.device)
        return x.detach().to(torch.float32) + residual

    def update(self, key: str, corrected: torch.Tensor, sent: torch.Tensor) -> None:
        """Keeps ``corrected - sent`` (in float32) as the residual of ``key``."""
        if corrected.shape != sent.shape:
            raise ValueError(
                f"error feedback {key!r}: sent shape {tuple(sent.shape)} "
                f"differs from corrected shape {tuple(corrected.shape)}"
            )
        diff = corrected.detach().to(torch.float32) - sent.detach().to(corrected.device)
        self._residuals[key] = diff.to(torch.float32)

    def residual(self, key: str) -> torch.Tensor | None:
        """The residual kept for ``key``, or None before its first ``update``."""
        return self._residuals.get(key)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every residual as a contiguous CPU copy, ready for ``safetensors.torch.save_file``."""
        return {
            key: residual.detach().to("cpu", copy=True).contiguous()
            for key, residual in self._residuals.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replaces every residual by those in ``state`` (copied, as float32).

        Raises:
            ConfigError: If an entry is not a finite floating-point tensor; nothing is replaced.
        """
        loaded: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                msg = f"error feedback state {key!r}: expected a float tensor, got {kind}"
                raise ConfigError(msg)
            if not bool(torch.isfinite(value).all()):
                raise ConfigError(f"error feedback state {key!r}: contains NaN or infinite values")
            loaded[str(key)] = value.detach().to(torch.float32, copy=True)
        self._residuals = loaded

    def reset(self) -> None:
        """Forgets every residual, e.g. after the codec or the model's shapes change."""
        self._residuals.clear()
