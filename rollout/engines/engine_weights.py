"""Weights of the `TorchEngine`: in-place loading of a new policy version, and the fused tensors.

The engine computes with fused copies of each layer's weights (q/k/v in one matrix, gate/up in one,
transposed output projections; `FusedLayer`). Loading a version copies into the model's parameters
and, where the fused tensors share the parameters' storage, into both at once; a pinned shared-memory
version (`services.weights.store`) is read in place without any copy. Every tensor is checked for
name, shape, dtype and finiteness before anything is copied, so a refused update leaves the engine
unchanged. `EngineWeights` is mixed into `TorchEngine`, whose model and geometry it reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from orchard.protocols import PinnableWeightSource, WeightSource


class FusedLayer(NamedTuple):
    """One decoder layer's weights, with q/k/v and gate/up fused (copies; see `TorchEngine.refresh`)."""

    input_norm: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    output_weight_t: torch.Tensor  # o_proj.weight transposed, for `addmm(residual, attn, w_t)`
    post_norm: torch.Tensor
    gate_up_weight: torch.Tensor
    down_weight_t: torch.Tensor


class EngineWeights:
    """The weight-loading half of `TorchEngine` (see the module docstring). It works on the engine's
    model parameters (`_parameters`, `_aliases`), its fused tensors (`_layers`, `_embed`, `_final_norm`,
    `_lm_head`) and `refresh()`, which rebuilds the fused tensors from the parameters."""

    #: False after a copy from a weight source was torn beyond repair (the weights are then a mix of
    #: versions), until a load succeeds.
    weights_valid: bool = True
    _shared_layers: list[FusedLayer] | None = None  # the `_layers` whose fused tensors the parameters view
    _kernel_layers: list[FusedLayer] | None = None  # the `_layers` that `_kernel_weight_list` holds
    _kernel_weight_list: list[torch.Tensor] | None = None
    _pinned: Any = None  # the pinned shared-memory version the engine's tensors view, if any

    def load_weights(self, state_dict: Mapping[str, torch.Tensor | np.ndarray] | Any, version: int) -> int:
        """Copy new weights into the model's tensors in place and become policy `version`; returns the
        version now held.

        `state_dict` is a mapping of names to tensors or numpy arrays, or a `WeightSource`
        (`orchard/protocols.py`; the shared-memory store's `WeightHandle`, a broadcast's
        `BroadcastSource`): `version`, a `layout` of specs (`name`, `shape`, `torch_dtype`) and
        `copy_into(targets) -> version`, which copies one consistent version, its own or a newer one,
        into `targets` and returns it.

        `version` must exceed the current `policy_version` (the first load may also equal it); a weight
        source must carry that same version, and the engine becomes the version the source actually
        copied (newer when the writer has moved on since the source was issued). All names, shapes and
        dtypes are checked before anything is copied, so a refused update leaves the engine unchanged.
        Every parameter must be present (`lm_head.weight` may be omitted when tied). Non-finite weights
        are refused: a mapping's tensors are checked here, before the copy (a sum per tensor, with an
        exact `isfinite` only when the sum is not finite); a weight source's writer checks every tensor
        before it makes a version visible (`SharedWeightStore.write`), so its bytes are not scanned
        again. A weight source whose copy was torn by its writer more often than it retries raises,
        and `weights_valid` stays False until a load succeeds.

        The copy goes straight into the tensors the forward pass reads: the q/k/v and gate/up
        parameters are views into the fused tensors (`_share_fused_storage`), so no second copy is
        made; when `refresh` builds fused tensors of another form it is called after the copy instead.

        A `PinnableWeightSource` (shared memory on this node) is not copied
        at all when the engine runs on the CPU in the source's dtypes: the parameters and fused
        tensors become read-only views of the pinned version (`_load_pinned`), which the writer
        leaves alone until the engine loads another version and releases it.
        """
        if version < self.policy_version or (version == self.policy_version and self.has_loaded_weights):
            raise ValueError(
                f"load_weights got version {version}, but the engine already holds policy version "
                f"{self.policy_version}; every update must carry a larger version"
            )
        source = None if isinstance(state_dict, Mapping) else state_dict
        if source is not None:
            if not isinstance(source, WeightSource):
                raise TypeError(
                    f"load_weights takes a mapping of tensors or arrays, or a weight source with `version`, "
                    f"`layout` and `copy_into`, not a {type(source).__name__}"
                )
            if source.version != version:
                raise ValueError(f"load_weights got version {version} with weights of version {source.version}")
            entries: Mapping[str, Any] = {spec.name: spec for spec in source.layout}
        else:
            entries = state_dict
        updates: dict[str, Any] = {}  # parameter -> tensor (mapping) or name in the source
        problems: list[str] = []
        seen: set[str] = set()
        for name, value in entries.items():
            target_name = self._aliases.get(name, name)
            if target_name not in self._parameters:
                problems.append(f"unknown parameter {name!r}")
                continue
            if source is not None:
                tensor, shape, dtype = None, tuple(value.shape), value.torch_dtype
            else:
                tensor = read_only_tensor(value) if isinstance(value, np.ndarray) else value
                if not isinstance(tensor, torch.Tensor):
                    problems.append(f"{name!r} is a {type(value).__name__}, not a tensor or numpy array")
                    continue
                shape, dtype = tuple(tensor.shape), tensor.dtype
            expected = tuple(self._parameters[target_name].shape)
            if shape != expected:
                problems.append(f"{name!r} has shape {shape}, the model's is {expected}")
                continue
            if not (dtype.is_floating_point and (tensor is None or all_finite(tensor))):
                problems.append(f"{name!r} holds non-finite values or is not floating point ({dtype})")
                continue
            seen.add(target_name)
            if name != target_name and target_name in entries:
                continue  # the tied alias of a tensor also given under its own name
            updates[target_name] = name if source is not None else tensor
        required = set(self._parameters) - set(self._aliases)
        problems += [f"missing parameter {name!r}" for name in sorted(required - seen)]
        if problems:
            shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise ValueError(f"load_weights refused version {version} (the engine keeps its weights): {shown}")
        with torch.no_grad():
            if isinstance(source, PinnableWeightSource) and source.pinnable:
                loaded = self._load_pinned(source, updates)
                if loaded is not None:
                    self.weights_valid = True
                    self.policy_version = loaded
                    self.has_loaded_weights = True
                    return loaded
            self._own_parameters()
            shared = self._share_fused_storage()
            if source is None:
                for name, tensor in updates.items():
                    self._parameters[name].copy_(tensor)
                loaded = version
            else:
                self.weights_valid = False
                loaded = int(source.copy_into({name: self._parameters[target] for target, name in updates.items()}))
            if not shared:
                self.refresh()
        self.weights_valid = True
        self.policy_version = loaded
        self.has_loaded_weights = True
        return loaded

    def _load_pinned(self, source: Any, updates: Mapping[str, str]) -> int | None:
        """Become views of a version `source.pin()` holds still; None (nothing changed) when the
        engine cannot (not on the CPU, other dtypes, fused tensors of a form `_share_fused_storage`
        does not know, or tensors to fuse that the writer did not place back to back).

        The layers are built as `refresh` builds them (checked by `_fused_form_recognised` on the
        current ones), over the pinned memory instead of copies."""
        specs = {spec.name: spec for spec in source.layout}
        if (
            self.device.type != "cpu"
            or any(specs[name].torch_dtype != self._parameters[target].dtype for target, name in updates.items())
            or FusedLayer._fields != _SHAREABLE_FIELDS
            or not self._fused_form_recognised()
        ):
            return None
        pinned = source.pin()
        views = {target: pinned.views[name] for target, name in updates.items()}
        for alias, target in self._aliases.items():
            views.setdefault(alias, views[target])
        layers = []
        for index in range(self.num_layers):
            prefix, attn = f"model.layers.{index}.", f"model.layers.{index}.self_attn."
            biases = [attn + f"{name}_proj.bias" for name in "qkv"]
            has_bias = all(name in views for name in biases)
            qkv = pinned.span([updates[attn + f"{name}_proj.weight"] for name in "qkv"])
            qkv_bias = pinned.span([updates[name] for name in biases]) if has_bias else None
            gate_up = pinned.span([updates[prefix + "mlp.gate_proj.weight"], updates[prefix + "mlp.up_proj.weight"]])
            if qkv is None or gate_up is None or (has_bias and qkv_bias is None):
                pinned.release()
                return None
            layers.append(
                FusedLayer(
                    input_norm=views[prefix + "input_layernorm.weight"],
                    qkv_weight=qkv,
                    qkv_bias=qkv_bias,
                    output_weight_t=views[attn + "o_proj.weight"].t(),
                    post_norm=views[prefix + "post_attention_layernorm.weight"],
                    gate_up_weight=gate_up,
                    down_weight_t=views[prefix + "mlp.down_proj.weight"].t(),
                )
            )
        for name, parameter in self._parameters.items():
            parameter.data = views[name]
        self._layers = self._shared_layers = layers
        self._embed = views["model.embed_tokens.weight"]
        self._final_norm = views["model.norm.weight"]
        self._lm_head = self._embed if self._tied else views["lm_head.weight"]
        previous, self._pinned = self._pinned, pinned
        if previous is not None:
            previous.release()
        return pinned.version

    def _own_parameters(self) -> None:
        """Give the parameters memory of their own again (copies of the pinned version) before a copy
        into them, and release the pin."""
        if self._pinned is None:
            return
        owned: dict[int, torch.Tensor] = {}
        for parameter in self._parameters.values():
            if id(parameter) not in owned:
                owned[id(parameter)] = parameter.data = parameter.data.clone()
        self._shared_layers = None
        self.refresh()
        self._pinned.release()
        self._pinned = None

    def _share_fused_storage(self) -> bool:
        """Make the q/k/v and gate/up parameters (and q/k/v biases) views into the fused tensors of
        `refresh`; True when every tensor the forward pass reads then shares the parameters' memory,
        so that copying into the parameters updates the engine without `refresh`.

        Done once per `refresh` (which builds new fused tensors; it runs here first, so they equal the
        parameters). False, and nothing changed, when the fused tensors are not of the form this
        recognises (concatenations along the first dimension, other tensors detached views or
        transposes of their parameters).
        """
        if self._shared_layers is not None and self._layers is self._shared_layers:
            return True
        if FusedLayer._fields != _SHAREABLE_FIELDS or not self._fused_form_recognised():
            return False
        self.refresh()
        for index, layer in enumerate(self._layers):
            for fused, parameters in self._fused_groups(index, layer):
                start = 0
                for parameter in parameters:
                    rows = parameter.shape[0]
                    parameter.data = fused[start : start + rows]
                    start += rows
        self._shared_layers = self._layers
        return True

    def _fused_groups(self, index: int, layer: FusedLayer) -> list[tuple[torch.Tensor, list[torch.nn.Parameter]]]:
        get = self._parameters.__getitem__
        prefix, attn = f"model.layers.{index}.", f"model.layers.{index}.self_attn."
        groups = [(layer.qkv_weight, [get(attn + f"{name}_proj.weight") for name in "qkv"])]
        if layer.qkv_bias is not None:
            groups.append((layer.qkv_bias, [get(attn + f"{name}_proj.bias") for name in "qkv"]))
        groups.append(
            (layer.gate_up_weight, [get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")])
        )
        return groups

    def _fused_form_recognised(self) -> bool:
        get = self._parameters.__getitem__

        def same_memory(tensor: torch.Tensor, name: str) -> bool:
            parameter = get(name)
            return tensor.data_ptr() == parameter.data_ptr() and tensor.numel() == parameter.numel()

        for index, layer in enumerate(self._layers):
            prefix, attn = f"model.layers.{index}.", f"model.layers.{index}.self_attn."
            for fused, parameters in self._fused_groups(index, layer):
                if not (
                    fused.is_contiguous()
                    and all(p.dtype == fused.dtype and p.device == fused.device for p in parameters)
                    and fused.shape[0] == sum(p.shape[0] for p in parameters)
                    and all(tuple(p.shape[1:]) == tuple(fused.shape[1:]) for p in parameters)
                ):
                    return False
            if not (
                same_memory(layer.input_norm, prefix + "input_layernorm.weight")
                and same_memory(layer.post_norm, prefix + "post_attention_layernorm.weight")
                and same_memory(layer.output_weight_t, attn + "o_proj.weight")
                and same_memory(layer.down_weight_t, prefix + "mlp.down_proj.weight")
            ):
                return False
        lm_head = "model.embed_tokens.weight" if self._tied else "lm_head.weight"
        return (
            same_memory(self._embed, "model.embed_tokens.weight")
            and same_memory(self._final_norm, "model.norm.weight")
            and same_memory(self._lm_head, lm_head)
        )


#: The `FusedLayer` fields `_share_fused_storage` knows how to share; any other form falls back to `refresh`.
_SHAREABLE_FIELDS = (
    "input_norm",
    "qkv_weight",
    "qkv_bias",
    "output_weight_t",
    "post_norm",
    "gate_up_weight",
    "down_weight_t",
)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in `tensor`. A sum is finite unless an element is not, or the sum overflows, which
    the exact check then settles; much cheaper than `isfinite(tensor).all()` on large tensors."""
    total = tensor.sum(dtype=torch.float32) if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing `array`'s memory, which is only read (copied into the model).

    Arrays from Ray's object store are read-only; torch warns about those, needlessly here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
