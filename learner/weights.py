"""State dicts as plain numpy arrays, the form weights travel in through the Ray object store.

Ray stores a dict of numpy arrays once and every reader maps it zero-copy, whereas torch tensors are
pickled and copied per reader. numpy has no bfloat16, so bf16 tensors become float32 on the way out
(exact: every bf16 value is a float32 value) and whoever loads them casts back into their own
parameters' dtype (`load_state_dict` copies with a cast).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

#: dtypes numpy cannot hold, and what they are widened to.
WIDENED_DTYPES = {torch.bfloat16: torch.float32}


def state_dict_to_numpy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A C-contiguous numpy copy of every tensor, on the CPU, keys unchanged.

    Copies always, so training that continues after the export never changes what was exported.
    bfloat16 becomes float32 (numpy has no bf16); every other dtype is kept. Tensors that share
    storage (tied embeddings) become independent arrays under each of their keys.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        dtype = WIDENED_DTYPES.get(tensor.dtype, tensor.dtype)
        copy = tensor.detach().to(device="cpu", dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        arrays[name] = copy.numpy()
    return arrays


def numpy_to_state_dict(arrays: Mapping[str, Any], *, copy: bool = False) -> dict[str, torch.Tensor]:
    """Tensors for `arrays` (numpy arrays; torch tensors pass through), ready for `load_state_dict`.

    Without `copy` the tensors share the arrays' memory. Arrays read from the Ray object store are
    read-only: such tensors are fine to read (`load_state_dict` only reads them) but must not be
    written in place; pass `copy=True` for tensors of their own.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, value in arrays.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().clone() if copy else value
            continue
        if not isinstance(value, np.ndarray):
            raise TypeError(f"weight {name!r} is a {type(value).__name__}; expected a numpy array or torch tensor")
        if value.dtype == object:
            raise TypeError(f"weight {name!r} has numpy dtype object, which has no tensor equivalent")
        if copy:
            tensors[name] = torch.from_numpy(np.array(value, copy=True, order="C"))
            continue
        with warnings.catch_warnings():
            # torch warns that a read-only array gives a tensor that must not be written: documented above.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors[name] = torch.from_numpy(value)
    return tensors
