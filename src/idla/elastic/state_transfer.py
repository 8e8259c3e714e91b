"""Hand one rank's model and optimizer state to every other rank, without pickle.

The optimizer's state dict is split into a JSON skeleton (numbers, strings, lists, with a
placeholder per tensor) and its tensors. The source's skeleton travels as JSON; every rank
allocates the tensors it describes and receives them with one broadcast each, so a peer can at
worst send malformed JSON. Everything travels on the control plane (gloo, CPU copies), so state
on a GPU, and state a GPU optimizer keeps on the CPU (Adam's ``step``), move alike on any
data-plane backend. Cost: one all-gather of the skeletons plus one broadcast per tensor, each
through a host copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from idla.runtime.collectives import all_gather_json
from idla.runtime.group import Group

_TENSOR = "__tensor__"


def broadcast_module_(model: nn.Module, src: int, group: Group) -> None:
    """Every rank's parameters and buffers become `src`'s (in place)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            host = tensor.detach().cpu().contiguous()
            group.control_broadcast(host, src=src)
            if group.rank != src:
                tensor.data.copy_(host)


def state_is_finite(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> bool:
    """True when every floating-point parameter, buffer and optimizer-state tensor is finite.

    Cost: one pass over the state on its devices and one host sync per device.
    """
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor)]
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point() or tensor.is_complex():
            flags.setdefault(tensor.device, []).append(torch.isfinite(tensor.detach()).all())
    return all(bool(torch.stack(group).all()) for group in flags.values())


def split_state(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A JSON-safe copy of `value` with each tensor replaced by a placeholder (appended to
    `tensors`, in walk order). Dict keys become strings; their type is kept in the marker."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {_TENSOR: len(tensors) - 1, "shape": list(value.shape),
                "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {"__dict__": [[_key(k), split_state(v, tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [split_state(v, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"optimizer state holds a {type(value).__name__}, which cannot be sent")


def join_state(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of `split_state`."""
    if isinstance(skeleton, dict) and _TENSOR in skeleton:
        return tensors[int(skeleton[_TENSOR])]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {_unkey(k): join_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    return skeleton


def _key(key: Any) -> list[Any]:
    if isinstance(key, bool | int | str):
        return [type(key).__name__, key]
    raise TypeError(f"optimizer state has a {type(key).__name__} key, which cannot be sent")


def _unkey(key: list[Any]) -> Any:
    kind, value = key
    return {"int": int, "str": str, "bool": bool}[kind](value)


def _placeholders(skeleton: Any, found: dict[int, tuple[list[int], str]]) -> None:
    if isinstance(skeleton, dict) and _TENSOR in skeleton:
        found[int(skeleton[_TENSOR])] = (list(skeleton["shape"]), str(skeleton["dtype"]))
    elif isinstance(skeleton, dict) and "__dict__" in skeleton:
        for _, v in skeleton["__dict__"]:
            _placeholders(v, found)
    elif isinstance(skeleton, list):
        for v in skeleton:
            _placeholders(v, found)


def broadcast_optimizer_(optimizer: torch.optim.Optimizer, src: int, group: Group) -> None:
    """Every rank's optimizer state becomes `src`'s (including state `src` has and others lack,
    e.g. Adam's moments when only `src` has stepped); ``load_state_dict`` puts each tensor
    where the optimizer keeps it."""
    mine: list[torch.Tensor] = []
    skeleton = split_state(optimizer.state_dict(), mine)
    theirs = all_gather_json({"state": skeleton}, group=group.control)[src]["state"]
    shapes: dict[int, tuple[list[int], str]] = {}
    _placeholders(theirs, shapes)
    tensors = []
    for index in range(len(shapes)):
        shape, dtype_name = shapes[index]
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"rank {src} sent optimizer state of unknown dtype {dtype_name!r}")
        if group.rank == src:
            tensor = mine[index].detach().cpu().clone().contiguous()
        else:
            tensor = torch.empty(shape, dtype=dtype)
        group.control_broadcast(tensor, src=src)
        tensors.append(tensor)
    optimizer.load_state_dict(join_state(theirs, tensors))
