"""Reading a pickled PyTorch model as data: its state dict, with no code of the file's choosing run.

TorchXRayVision's DenseNet release files are whole models saved with ``torch.save(model)``
(a pickle that names the model's classes), in torch's zip format or its legacy one.
``torch.load(weights_only=True)`` refuses them, and ``weights_only=False`` lets the file call
anything it names. This module reads them with a restricted unpickler instead:

- ``find_class`` is the only way a pickle reaches a Python object (GLOBAL, STACK_GLOBAL, INST
  and the EXT opcodes all go through it). It answers only for tensor data (torch's own
  rebuild functions, behind wrappers that check their arguments), plain containers, and
  ``torch.nn`` / TorchXRayVision ``nn.Module`` classes; anything else refuses the file.
- A module class is never returned: its name maps to an inert placeholder class that only
  keeps the state BUILD hands it (no constructor, no ``__setstate__`` of the real class runs;
  the real TorchXRayVision constructors would read a second file with ``weights_only=False``).
  The state dict is then taken from the placeholders' ``_parameters`` / ``_buffers`` /
  ``_modules``, as ``nn.Module.state_dict`` would.
- Storages are allocated only at the sizes the file's bytes can fill; the pickle must be read
  to its last byte (zip: ``data.pkl`` exactly; legacy: the five pickles and every storage).

The caller reads the file once and hands over its bytes: nothing is reopened by path.
"""

from __future__ import annotations

import importlib
import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any

import torch

# torch.serialization.MAGIC_NUMBER / PROTOCOL_VERSION of the legacy (pre-1.6) format
LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
# modules whose nn.Module classes may be named (mapped to placeholders, never imported as code to run)
MODULE_NAMESPACES = ("torch.nn.modules.", "torchxrayvision.models")
_MAX_DEPTH = 64  # nesting of submodules in the state-dict walk (a crafted cycle must not recurse forever)


class PickleRefused(ValueError):
    """The file is not a pickled model made only of tensors, containers and module classes.
    The message is one line naming what was refused (a global, an opcode, a malformed part)."""


class _StorageType:
    """What ``torch.FloatStorage`` & co. stand for in a pickle: only their dtype."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


_STORAGE_TYPES = {f"{name}Storage": _StorageType(f"{name}Storage", dtype) for name, dtype in {
    "Float": torch.float32, "Double": torch.float64, "Half": torch.float16, "BFloat16": torch.bfloat16,
    "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
    "Bool": torch.bool}.items()}


class InertModule:
    """Stands in for an ``nn.Module`` class a pickle names: building it runs nothing, and BUILD
    only stores the state (the module's ``__dict__``: parameters, buffers, submodules)."""

    module_class = ""  # "module.name" of the class it stands for

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertModule":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise PickleRefused(f"{self.module_class}'s state is a {type(state).__name__}, not a module's __dict__")
        self.__dict__["_pickled_state"] = state


def _check_hooks(hooks: Any) -> OrderedDict:
    """Backward hooks are never saved with values; a pickle that brings some is refused."""
    if not isinstance(hooks, dict) or hooks:
        raise PickleRefused("a tensor carries backward hooks (saved tensors never do)")
    return OrderedDict()


def _check_storage(storage: Any) -> None:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise PickleRefused(f"a tensor is built on a {type(storage).__name__}, not on a storage of the file")


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any) -> torch.Tensor:
    _check_storage(storage)
    return torch._utils._rebuild_tensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage: Any, offset: int, size: Any, stride: Any, requires_grad: Any,
                       hooks: Any, metadata: Any = None) -> torch.Tensor:
    _check_storage(storage)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, bool) for k, v in metadata.items())):
        raise PickleRefused("a tensor's metadata is not a dict of flags")
    return torch._utils._rebuild_tensor_v2(storage, int(offset), tuple(size), tuple(stride), bool(requires_grad),
                                           _check_hooks(hooks), metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor):
        raise PickleRefused(f"a parameter is built from a {type(data).__name__}, not a tensor")
    return torch._utils._rebuild_parameter(data, bool(requires_grad), _check_hooks(hooks))


def _parameter(data: Any = None, requires_grad: Any = True) -> torch.nn.Parameter:
    """``torch.nn.Parameter`` called by the pickle (old files): a tensor only."""
    return _rebuild_parameter(data, requires_grad, OrderedDict())


# (module, name) -> the object the pickle gets for it: tensor data and plain containers
_DATA = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _parameter,
    ("torch", "Size"): torch.Size,
}


# TorchXRayVision's model classes, for reading its files where it is not installed
TXRV_CLASSES = frozenset({"DenseNet", "ResNet", "_DenseLayer", "_DenseBlock", "_Transition"})


def _module_class_exists(module: str, name: str) -> bool:
    """Whether ``module.name`` is a torch / TorchXRayVision ``nn.Module`` class (only its name
    is used: the class is never called). Importing an installed package's module runs trusted
    code; without TorchXRayVision its classes are known by name."""
    if module == MODULE_NAMESPACES[1] and name in TXRV_CLASSES:
        return True
    if not module.startswith(MODULE_NAMESPACES):
        return False
    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return False
    return isinstance(obj, type) and issubclass(obj, torch.nn.Module)


class _RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the names above; storages come from ``storages``."""

    def __init__(self, stream: io.BytesIO, storages: "_Storages"):
        super().__init__(stream, encoding="utf-8")
        self._storages = storages
        self._placeholders: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _DATA:
            return _DATA[key]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if key not in self._placeholders:
            if not _module_class_exists(module, name):
                raise PickleRefused(f"the pickle names {module}.{name}, which is not a torch or TorchXRayVision "
                                    f"model class or tensor data")
            self._placeholders[key] = type(name, (InertModule,), {"module_class": f"{module}.{name}"})
        return self._placeholders[key]

    def persistent_load(self, pid: Any) -> Any:
        return self._storages.load(pid)


class _Storages:
    """Storages named by a pickle's persistent ids, filled from the file's own bytes."""

    def __init__(self, zip_file: zipfile.ZipFile | None = None, prefix: str = "", budget: int = 0):
        self.zip, self.prefix, self.budget = zip_file, prefix, budget  # legacy: bytes left to fill them
        self.by_key: dict[str, torch.storage.TypedStorage] = {}

    def load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage", "module", b"module"):
            raise PickleRefused(f"unknown persistent id {str(pid)[:80]!r}")
        if pid[0] in ("module", b"module"):  # legacy files name module classes with their source
            if len(pid) < 2 or not (isinstance(pid[1], type) and issubclass(pid[1], InertModule)):
                raise PickleRefused("a module entry does not name a model class")
            return pid[1]
        if self.zip is not None:
            return self._zip_storage(pid)
        return self._legacy_storage(pid)

    @staticmethod
    def _fields(pid: tuple, n: int) -> tuple:
        if len(pid) != n or not isinstance(pid[1], _StorageType):
            raise PickleRefused(f"malformed storage entry {str(pid)[:80]!r}")
        return pid[1:]

    def _new(self, key: Any, dtype: torch.dtype, numel: Any) -> torch.storage.TypedStorage:
        if not isinstance(numel, int) or numel < 0:
            raise PickleRefused(f"storage {key!r} has {numel!r} elements")
        nbytes = numel * torch._utils._element_size(dtype)
        if nbytes > self.budget:
            raise PickleRefused(f"storage {key!r} claims {nbytes} bytes, more than the file holds")
        self.budget -= nbytes
        return torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(nbytes), dtype=dtype, _internal=True)

    def _zip_storage(self, pid: tuple) -> torch.storage.TypedStorage:
        storage_type, key, _location, numel = self._fields(pid, 5)
        key = str(key)
        if key not in self.by_key:
            name = f"{self.prefix}/data/{key}"
            try:
                info = self.zip.getinfo(name)
            except KeyError:
                raise PickleRefused(f"storage {key!r} has no record {name}") from None
            self.budget = info.file_size
            storage = self._new(key, storage_type.dtype, numel)
            if info.file_size != storage._untyped_storage.nbytes():
                raise PickleRefused(f"record {name} holds {info.file_size} bytes, its storage "
                                    f"{storage._untyped_storage.nbytes()}")
            _fill(storage, self.zip.read(name))
            self.by_key[key] = storage
        storage = self.by_key[key]
        if storage.dtype != storage_type.dtype:
            raise PickleRefused(f"storage {key!r} is read as two dtypes")
        return storage

    def _legacy_storage(self, pid: tuple) -> torch.storage.TypedStorage:
        storage_type, key, _location, numel, view = self._fields(pid, 6)
        if key not in self.by_key:
            self.by_key[key] = self._new(key, storage_type.dtype, numel)
        storage = self.by_key[key]
        if storage.dtype != storage_type.dtype:
            raise PickleRefused(f"storage {key!r} is read as two dtypes")
        if view is None:
            return storage
        if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) and v >= 0 for v in view[1:])):
            raise PickleRefused(f"malformed storage view {str(view)[:80]!r}")
        size = torch._utils._element_size(storage.dtype)
        start, stop = view[1] * size, (view[1] + view[2]) * size
        if stop > storage._untyped_storage.nbytes():
            raise PickleRefused(f"a view of storage {key!r} reaches past its end")
        return torch.storage.TypedStorage(wrap_storage=storage._untyped_storage[start:stop], dtype=storage.dtype,
                                          _internal=True)


def _fill(storage: torch.storage.TypedStorage, data: bytes | memoryview) -> None:
    """Copy little-endian ``data`` (exactly the storage's size) into ``storage``."""
    if len(data) != storage._untyped_storage.nbytes():
        raise PickleRefused(f"a storage of {storage._untyped_storage.nbytes()} bytes gets {len(data)}")
    if data:
        target = torch.empty(0, dtype=torch.uint8).set_(storage._untyped_storage)
        target.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _unpickle(stream: io.BytesIO, storages: _Storages, what: str) -> Any:
    """One pickle from ``stream`` with the restricted unpickler; any failure is a refusal."""
    try:
        return _RestrictedUnpickler(stream, storages).load()
    except PickleRefused:
        raise
    except Exception as e:  # UnpicklingError, EOFError, TypeError from a wrong-shaped REDUCE, ...
        raise PickleRefused(f"malformed {what} at byte {stream.tell()}: {type(e).__name__}: {e}") from e


def _load_zip(data: bytes) -> Any:
    """torch's zip format: ``<prefix>/data.pkl`` and ``<prefix>/data/<key>`` records (stored)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
        prefix = names[0].split("/", 1)[0] if names else ""
        if len(set(names)) != len(names):
            raise PickleRefused("the zip archive holds two records of one name")
        if not names or any(not n.startswith(prefix + "/") for n in names):
            raise PickleRefused("the zip archive's records do not share one top folder, as torch.save writes")
        if any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist()):
            raise PickleRefused("the zip archive holds compressed records (torch.save stores them)")
        if f"{prefix}/byteorder" in names and z.read(f"{prefix}/byteorder") != b"little":
            raise PickleRefused("the tensors are stored big-endian")
        if f"{prefix}/data.pkl" not in names:
            raise PickleRefused(f"the zip archive has no {prefix}/data.pkl")
        pkl = io.BytesIO(z.read(f"{prefix}/data.pkl"))
        result = _unpickle(pkl, _Storages(z, prefix), "data.pkl")
        if pkl.tell() != len(pkl.getbuffer()):
            raise PickleRefused(f"data.pkl has {len(pkl.getbuffer()) - pkl.tell()} bytes after its end")
        return result


def _load_legacy(data: bytes) -> Any:
    """torch's legacy format: magic, protocol, system info, the object, its storage keys, then
    each storage as an int64 element count and its bytes."""
    stream = io.BytesIO(data)
    storages = _Storages(budget=len(data))
    header = [_unpickle(stream, storages, f"header pickle {i + 1}") for i in range(3)]
    if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL:
        raise PickleRefused("not a torch file (no legacy magic number)")
    if not isinstance(header[2], dict) or header[2].get("little_endian") is not True:
        raise PickleRefused("the tensors are not stored little-endian")
    result = _unpickle(stream, storages, "the model's pickle")
    keys = _unpickle(stream, storages, "the storage keys")
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(map(str, storages.by_key)):
        raise PickleRefused("the storage keys do not match the storages the pickle uses")
    view = memoryview(data)
    for key in keys:
        storage, at = storages.by_key[key], stream.tell()
        if at + 8 > len(data):
            raise PickleRefused(f"storage {key!r} is cut short")
        (count,) = struct.unpack("<q", view[at:at + 8])
        if count * torch._utils._element_size(storage.dtype) != storage._untyped_storage.nbytes():
            raise PickleRefused(f"storage {key!r} holds {count} elements, its pickle says otherwise")
        _fill(storage, view[at + 8:at + 8 + storage._untyped_storage.nbytes()])
        stream.seek(at + 8 + storage._untyped_storage.nbytes())
    if stream.tell() != len(data):
        raise PickleRefused(f"{len(data) - stream.tell()} bytes after the last storage")
    return result


def load_pickled(data: bytes) -> Any:
    """The object a ``torch.save`` file (zip or legacy format) holds, read from ``data`` by the
    restricted unpickler: tensors, containers and :class:`InertModule` placeholders. Raises
    :class:`PickleRefused` (one line: what was refused) for anything else."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        return _load_zip(data)
    return _load_legacy(data)


def module_state_dict(obj: Any, prefix: str = "", depth: int = 0) -> dict[str, torch.Tensor]:
    """``state_dict()`` of a placeholder model: its parameters and persistent buffers, then its
    submodules' under ``name.``, as ``nn.Module.state_dict`` orders them."""
    if depth > _MAX_DEPTH:
        raise PickleRefused(f"modules nested deeper than {_MAX_DEPTH} (a cycle?) at {prefix!r}")
    state = obj.__dict__.get("_pickled_state")
    if state is None:
        raise PickleRefused(f"{obj.module_class} at {prefix or 'the top'!r} was never given its state")
    out: dict[str, torch.Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise PickleRefused(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + str(name)] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, InertModule):
            raise PickleRefused(f"submodule {prefix}{name} is a {type(child).__name__}, not a model class")
        out.update(module_state_dict(child, f"{prefix}{name}.", depth + 1))
    return out
