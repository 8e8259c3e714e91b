"""Batches as a collate function returns them: tensors inside dicts, lists, tuples, namedtuples
and user objects. One recursive walk (the shape of DDP's ``_recursive_to`` and of
``torch.utils._pytree``) moves them to a device, empties them, or maps their tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def map_tensors(fn: TensorFn, obj: Any, *, other: Callable[[Any], Any] | None = None) -> Any:
    """`obj` with every tensor t inside replaced by fn(t), containers rebuilt with their type
    (dict and Mapping subclasses, list, tuple, namedtuple); any other value goes through
    `other` (default: kept as it is)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if _is_namedtuple(obj):
        return type(obj)(*(map_tensors(fn, v, other=other) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(map_tensors(fn, v, other=other) for v in obj)
    if isinstance(obj, Mapping) and not callable(getattr(obj, "to", None)):
        items = {k: map_tensors(fn, v, other=other) for k, v in obj.items()}
        try:
            return type(obj)(items)  # type: ignore[call-arg]
        except TypeError:  # a Mapping whose constructor takes something else
            return items
    return obj if other is None else other(obj)


def move_to(batch: Any, device: torch.device, *, non_blocking: bool = False) -> Any:
    """`batch` on `device`: tensors moved, containers rebuilt, objects with a ``.to`` method
    asked to move themselves (``obj.to(device)``); anything else kept."""

    def move_object(obj: Any) -> Any:
        to = getattr(obj, "to", None)
        return to(device) if callable(to) else obj

    return map_tensors(lambda t: t.to(device, non_blocking=non_blocking), batch,
                       other=move_object)


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, list | tuple):
        return any(_holds_tensor(v) for v in obj)
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v) for v in obj.values())
    return False


def empty_batch(batch: Any) -> Any:
    """The 0-sample version of a batch collated from samples: every tensor cut to 0 rows along
    dim 0; a list or tuple holding no tensor (per-sample values: strings, ids) emptied;
    containers otherwise rebuilt; other objects kept as they are (the collate of the samples
    it was made from)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, list | tuple) and not _is_namedtuple(batch) and not _holds_tensor(batch):
        return type(batch)()
    if _is_namedtuple(batch):
        return type(batch)(*(empty_batch(v) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(empty_batch(v) for v in batch)
    if isinstance(batch, Mapping):
        items = {k: empty_batch(v) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    return batch
