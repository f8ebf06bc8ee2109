"""Probe batches as checkpoint data that loads under ``torch.load(weights_only=True)``.

Lightning loads checkpoints with ``weights_only=True``, which refuses arbitrary classes: a probe
batch that is a ``namedtuple``, a ``UserDict`` (a Hugging Face ``BatchEncoding`` is one) or a
dataclass, stored as it is, would make the whole checkpoint unloadable. Batches are therefore
encoded into tensors and plain containers, with the container's class recorded by its import
path and rebuilt on load. A batch that cannot be encoded (a custom class, a NumPy array) is
not stored at all: the callback re-captures its probe on resume and says so.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

_TAG = "__lightning_hessian_type__"
_PLAIN = (bool, int, float, str, type(None))


class UnsupportedBatchError(TypeError):
    """A probe batch holds a type that cannot be stored in a ``weights_only`` checkpoint."""


def encode_batches(batches: list[Any]) -> list[Any]:
    """Encode every batch (tensors detached to the CPU); raises :class:`UnsupportedBatchError`.

    The result is checked to load under ``weights_only=True`` and to decode into the same
    container types, so what is stored is known to come back.
    """
    encoded = [_encode(b) for b in batches]
    buffer = io.BytesIO()
    torch.save(encoded, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as err:  # pragma: no cover - every encoded type is a weights_only-safe one
        raise UnsupportedBatchError(f"the encoded probe does not load with weights_only=True: {err}") from err
    for original, stored in zip(batches, encoded):
        if type(decode(stored)) is not type(original):
            raise UnsupportedBatchError(f"a {type(original).__name__} batch does not decode to its own type")
    return encoded


def decode(value: Any) -> Any:
    """Rebuild a batch encoded by :func:`encode_batches` (raises ``ImportError``/``TypeError`` on failure)."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(decode(v) for v in value)
    if not isinstance(value, dict):
        return value
    kind = value.get(_TAG)
    if kind is None:
        return {k: decode(v) for k, v in value.items()}
    if kind == "dict":
        return {k: decode(v) for k, v in value["items"].items()}
    cls = _import_class(value["class"])
    if kind == "namedtuple":
        return cls(*[decode(v) for v in value["fields"]])
    if kind == "mapping":
        return cls({k: decode(v) for k, v in value["items"].items()})
    if kind == "dataclass":
        return cls(**{k: decode(v) for k, v in value["fields"].items()})
    raise TypeError(f"unknown encoded batch kind {kind!r}")


def _encode(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, _PLAIN):
        return value
    if type(value) is list:
        return [_encode(v) for v in value]
    if type(value) is tuple:
        return tuple(_encode(v) for v in value)
    if type(value) is dict:
        items = {_key(k): _encode(v) for k, v in value.items()}
        return {_TAG: "dict", "items": items} if _TAG in items else items
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {_TAG: "namedtuple", "class": _class_path(value), "fields": [_encode(v) for v in value]}
    if isinstance(value, Mapping):
        return {_TAG: "mapping", "class": _class_path(value), "items": {_key(k): _encode(v) for k, v in value.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return {_TAG: "dataclass", "class": _class_path(value), "fields": fields}
    raise UnsupportedBatchError(
        f"a probe batch holds a {type(value).__module__}.{type(value).__qualname__}, which a weights_only "
        "checkpoint cannot store (supported: tensors, numbers, strings, None, lists, tuples, dicts, namedtuples, "
        "Mapping classes such as UserDict or BatchEncoding, dataclasses)"
    )


def _key(key: Any) -> Any:
    if not isinstance(key, _PLAIN):
        raise UnsupportedBatchError(f"a probe batch has a dict key of type {type(key).__name__}")
    return key


def _class_path(value: Any) -> str:
    cls = type(value)
    if "<locals>" in cls.__qualname__:
        raise UnsupportedBatchError(
            f"a probe batch is a {cls.__qualname__}, defined inside a function, so it cannot be re-imported on resume"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> Any:
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"{path} is not a class")
    return obj
