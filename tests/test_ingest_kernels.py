"""The append path's compiled checks against torch references: NaN/Inf counts for every storage dtype, and the
per-KV-head key-norm bound the exact scan relies on (never below the true norm, barely above it)."""

import pytest
import torch

from kvd import ingest_kernels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_count_nonfinite_matches_isfinite(dtype):
    gen = torch.Generator().manual_seed(3)
    tensor = torch.randn(3, 5, 200, generator=gen).to(dtype)
    flat = tensor.view(-1)
    flat[7], flat[300], flat[2999] = float("nan"), float("inf"), float("-inf")
    flat[1000] = torch.finfo(dtype).max  # largest finite: exponent not all ones
    assert ingest_kernels.count_nonfinite(tensor) == int((~torch.isfinite(tensor)).sum()) == 3
    assert ingest_kernels.count_nonfinite(tensor[:, 1:3]) == int((~torch.isfinite(tensor[:, 1:3])).sum())
    assert ingest_kernels.count_nonfinite(torch.zeros(0, dtype=dtype)) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_max_key_norm_is_a_tight_upper_bound(dtype):
    gen = torch.Generator().manual_seed(4)
    keys = (torch.randn(4, 333, 64, generator=gen) * torch.tensor([0.1, 1.0, 10.0, 300.0]).view(4, 1, 1)).to(dtype)
    exact = keys.double().norm(dim=-1).amax(dim=1)
    bound = ingest_kernels.max_key_norm(keys).double()
    assert bound.shape == (4,)
    assert torch.all(bound >= exact)
    assert torch.all(bound <= exact * (1 + 5e-5))
    # a strided view of a larger store (as a session's layer is) gives the same bound
    store = torch.zeros(4, 400, 64, dtype=dtype)
    store[:, :333] = keys
    torch.testing.assert_close(ingest_kernels.max_key_norm(store[:, :333]), ingest_kernels.max_key_norm(keys),
                               rtol=1e-6, atol=0)
    assert torch.equal(ingest_kernels.max_key_norm(keys[:, :0]), torch.zeros(4))
