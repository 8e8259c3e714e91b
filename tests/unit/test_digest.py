"""`tensor_digest`: exact (one ulp anywhere changes it), deterministic, every dtype."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from idla.runtime.digest import tensor_digest, tensor_digests

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
          torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64,
          torch.complex128]


def _tensors(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(37, 5, generator=generator), torch.randn(1001, generator=generator),
            torch.randn(2, 3, 4, generator=generator).double()]


def _next_ulp(tensor: torch.Tensor, index: int) -> torch.Tensor:
    changed = tensor.clone().reshape(-1)
    changed[index] = torch.nextafter(changed[index], torch.tensor(float("inf"),
                                                                  dtype=tensor.dtype))
    return changed.reshape(tensor.shape)


def _sample(dtype: torch.dtype, numel: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(numel, generator=generator) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(numel, generator=generator).to(dtype)
    return torch.randint(0, 100, (numel,), generator=generator).to(dtype)


def test_equal_tensors_give_equal_digests() -> None:
    assert tensor_digest(_tensors(0)) == tensor_digest(_tensors(0))
    assert tensor_digest(_tensors(0)) != tensor_digest(_tensors(1))
    assert -(1 << 63) <= tensor_digest(_tensors(0)) < 1 << 63


@settings(max_examples=60, deadline=None)
@given(which=st.integers(0, 2), position=st.integers(0, 10**6))
def test_one_ulp_anywhere_changes_the_digest(which: int, position: int) -> None:
    tensors = _tensors(3)
    index = position % tensors[which].numel()
    changed = list(tensors)
    changed[which] = _next_ulp(tensors[which], index)

    assert tensor_digest(changed) != tensor_digest(tensors)
    assert tensor_digests(changed)[which] != tensor_digests(tensors)[which]


@settings(max_examples=40, deadline=None)
@given(position=st.integers(0, 10**6), bit=st.integers(0, 15),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_any_bit_of_a_half_precision_element_changes_the_digest(
    position: int, bit: int, dtype: torch.dtype
) -> None:
    tensor = _sample(dtype, 999, 5)
    changed = tensor.clone()
    as_int = changed.view(torch.int16)
    as_int[position % 999] ^= torch.tensor(1 << bit if bit < 15 else -(1 << 15),
                                           dtype=torch.int16)

    assert tensor_digest([changed]) != tensor_digest([tensor])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_is_covered_and_a_change_of_one_element_is_seen(dtype: torch.dtype) -> None:
    tensor = _sample(dtype, 257, 1)
    changed = tensor.clone()
    changed[100] = ~changed[100] if dtype == torch.bool else changed[100] + 1

    assert tensor_digest([tensor]) == tensor_digest([tensor.clone()])
    assert tensor_digest([changed]) != tensor_digest([tensor])


def test_order_shape_and_dtype_are_part_of_the_digest() -> None:
    a, b = torch.randn(6), torch.randn(6)

    assert tensor_digest([a, b]) != tensor_digest([b, a])
    assert tensor_digest([a]) != tensor_digest([a.reshape(2, 3)])
    assert tensor_digest([a]) != tensor_digest([a.view(torch.int32)])
    assert tensor_digest([a]) != tensor_digest([a, torch.empty(0)])


def test_moving_elements_between_positions_changes_the_digest() -> None:
    tensor = torch.arange(1000, dtype=torch.float32)
    swapped = tensor.clone()
    swapped[[10, 900]] = swapped[[900, 10]]

    assert tensor_digest([swapped]) != tensor_digest([tensor])


def test_non_contiguous_tensors_digest_as_their_contiguous_copy() -> None:
    tensor = torch.randn(8, 9)

    assert tensor_digest([tensor.t()]) == tensor_digest([tensor.t().contiguous()])


def test_the_digest_does_not_depend_on_the_thread_count() -> None:
    tensors = [torch.randn(300_000), torch.randn(4096, 3).double()]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tensor_digest(tensors)
        torch.set_num_threads(2)
        two = tensor_digest(tensors)
    finally:
        torch.set_num_threads(threads)

    assert one == two


def test_the_digest_is_pinned() -> None:
    # Ranks in other processes (another hash seed, a GPU) must compute the same number
    tensors = [torch.arange(10, dtype=torch.float32), torch.tensor([True, False])]

    assert tensor_digest(tensors) == -1590413621281687279


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_tensor_digests_as_its_cpu_copy() -> None:
    tensors = _tensors(4)

    assert tensor_digest([t.cuda() for t in tensors]) == tensor_digest(tensors)
