"""Reading a pickled PyTorch model as data: its state dict, with no code of the file's choosing run.

TorchXRayVision's DenseNet release files are whole models saved with ``torch.save(model)``
(a pickle that names the model's classes), in torch's zip format or its legacy one.
``torch.load(weights_only=True)`` refuses them, and ``weights_only=False`` lets the file call
anything it names. This module reads them with a restricted unpickler instead:

- The unpickler is Python's own pure-Python one (its memo is a dict: the C unpickler's memo
  array grows to any index a 43-byte file names). ``find_class`` is the only way a pickle
  reaches a Python object (GLOBAL, STACK_GLOBAL, INST and the EXT opcodes all go through it).
  It answers only for tensor data (torch's own rebuild functions, behind wrappers that check
  their arguments and the tensor's extent), plain containers, and ``torch.nn`` /
  TorchXRayVision ``nn.Module`` classes; anything else refuses the file. BUILD is allowed on
  the placeholders only, so no object the reader hands out can be modified by the file.
- A module class is never returned: its name maps to an inert placeholder class that only
  keeps the state BUILD hands it (no constructor, no ``__setstate__`` of the real class runs;
  the real TorchXRayVision constructors would read a second file with ``weights_only=False``).
  The state dict is then taken from the placeholders' ``_parameters`` / ``_buffers`` /
  ``_modules``, as ``nn.Module.state_dict`` would.
- Storages are allocated only at the sizes the file's bytes can fill, and cannot be resized
  (a tensor reaching past its storage is refused); the pickle must be read to its last byte
  (zip: ``data.pkl`` exactly; legacy: the five pickles and every storage). Refusals describe
  what the file brought by type and position, never by ``repr`` (a file can make that
  exponentially large), and a module tree must be a tree (no module reached twice).

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
_MAX_TENSORS = 100_000  # entries of one state dict (DenseNet-121 has ~1,000)


class PickleRefused(ValueError):
    """The file is not a pickled model made only of tensors, containers and module classes.
    The message is one line naming what was refused (a global, an opcode, a malformed part)."""


class _StorageType:
    """What ``torch.FloatStorage`` & co. stand for in a pickle: only their dtype."""

    __slots__ = ("name", "dtype")

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


def _ints(value: Any, what: str) -> tuple[int, ...]:
    """``value`` as a tuple of at most 16 ints (a tensor's size or stride)."""
    if not isinstance(value, (tuple, list)) or len(value) > 16 or not all(type(v) is int for v in value):
        raise PickleRefused(f"a tensor's {what} is a {type(value).__name__}, not a short tuple of ints")
    return tuple(value)


def _check_extent(storage: Any, offset: Any, size: Any, stride: Any) -> tuple[int, tuple, tuple]:
    """The tensor's offset, size and stride, checked to lie inside ``storage`` (a storage of
    the file), so no tensor reads past the bytes the file brought."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise PickleRefused(f"a tensor is built on a {type(storage).__name__}, not on a storage of the file")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride) or min(size, default=0) < 0 \
            or min(stride, default=0) < 0:
        raise PickleRefused("a tensor's offset, size or stride is negative or mismatched")
    numel = storage._untyped_storage.nbytes() // torch._utils._element_size(storage.dtype)
    if all(size) and offset + sum((n - 1) * st for n, st in zip(size, stride)) >= numel:
        raise PickleRefused(f"a tensor reaches past its storage ({numel} elements)")
    return offset, size, stride


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any) -> torch.Tensor:
    return torch._utils._rebuild_tensor(storage, *_check_extent(storage, offset, size, stride))


def _rebuild_tensor_v2(storage: Any, offset: int, size: Any, stride: Any, requires_grad: Any,
                       hooks: Any, metadata: Any = None) -> torch.Tensor:
    offset, size, stride = _check_extent(storage, offset, size, stride)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, bool) for k, v in metadata.items())):
        raise PickleRefused("a tensor's metadata is not a dict of flags")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, bool(requires_grad),
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


def _describe(value: Any) -> str:
    """A refused value by its type only: its repr could be exponentially large."""
    return f"a {type(value).__name__}" + (f" of {len(value)} items" if isinstance(value, (tuple, list)) else "")


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: a dict memo
    """A pickle reader that resolves only the names above; storages come from ``storages``;
    BUILD only on model placeholders."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, stream: io.BytesIO, storages: "_Storages"):
        super().__init__(stream, encoding="utf-8")
        self._storages = storages
        self._placeholders: dict[tuple[str, str], type] = {}

    def load_build(self) -> None:
        """BUILD: only a model placeholder takes state (a module's ``__dict__``); on anything
        else (a rebuild function, a tensor, a storage type) it would change what this reader
        hands out, in this file and the next."""
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, InertModule):
            raise PickleRefused(f"BUILD on {_describe(inst)}: only model classes take state")
        inst.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build

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
        if not isinstance(pid, tuple) or not pid or not isinstance(pid[0], (str, bytes)) \
                or pid[0] not in ("storage", b"storage", "module", b"module"):
            raise PickleRefused(f"unknown persistent id: {_describe(pid)}")
        if pid[0] in ("module", b"module"):  # legacy files name module classes with their source
            if len(pid) < 2 or not (isinstance(pid[1], type) and issubclass(pid[1], InertModule)):
                raise PickleRefused("a module entry does not name a model class")
            return pid[1]
        if self.zip is not None:
            return self._zip_storage(pid)
        return self._legacy_storage(pid)

    @staticmethod
    def _fields(pid: tuple, n: int) -> tuple:
        if len(pid) != n or not isinstance(pid[1], _StorageType) or type(pid[2]) is not str or len(pid[2]) > 64:
            raise PickleRefused(f"malformed storage entry: {_describe(pid)}")
        return pid[1:]

    def _new(self, key: str, dtype: torch.dtype, numel: Any, data: bytes | None = None) -> torch.storage.TypedStorage:
        """A storage of ``numel`` elements that cannot be resized: ``data`` when given, else zeros."""
        if type(numel) is not int or numel < 0:
            raise PickleRefused(f"storage {key!r} has {_describe(numel)} for its element count")
        nbytes = numel * torch._utils._element_size(dtype)
        if nbytes > self.budget:
            raise PickleRefused(f"storage {key!r} claims {nbytes} bytes, more than the file holds")
        self.budget -= nbytes
        buffer = bytearray(data) if data is not None else bytearray(nbytes)
        if len(buffer) != nbytes:
            raise PickleRefused(f"storage {key!r} holds {len(buffer)} bytes, its pickle says {nbytes}")
        untyped = (torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage() if nbytes
                   else torch.empty(0, dtype=torch.uint8).untyped_storage())  # empty: _check_extent allows no element
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    def _zip_storage(self, pid: tuple) -> torch.storage.TypedStorage:
        storage_type, key, _location, numel = self._fields(pid, 5)
        if key not in self.by_key:
            name = f"{self.prefix}/data/{key}"
            try:
                info = self.zip.getinfo(name)
            except KeyError:
                raise PickleRefused(f"storage {key!r} has no record {name}") from None
            self.budget = info.file_size
            self.by_key[key] = self._new(key, storage_type.dtype, numel, self.zip.read(name))
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
        if not (isinstance(view, tuple) and len(view) == 3 and type(view[0]) is str
                and all(type(v) is int and v >= 0 for v in view[1:])):
            raise PickleRefused(f"malformed storage view: {_describe(view)}")
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
        # by type only: the message could hold the repr of the file's objects (of any size)
        raise PickleRefused(f"malformed {what} at byte {stream.tell()}: {type(e).__name__}") from e


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
    if not (isinstance(keys, list) and all(type(k) is str for k in keys) and len(keys) == len(set(keys))
            and set(keys) == set(storages.by_key)):
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
    try:
        return _load_zip(data) if zipfile.is_zipfile(io.BytesIO(data)) else _load_legacy(data)
    except PickleRefused:
        raise
    except Exception as e:  # a malformed archive or storage tail: still a refusal, by type only
        raise PickleRefused(f"malformed file: {type(e).__name__}") from e


def module_state_dict(top: Any) -> dict[str, torch.Tensor]:
    """``state_dict()`` of a placeholder model: its parameters and persistent buffers, then its
    submodules' under ``name.``, as ``nn.Module.state_dict`` orders them. The modules must form
    a tree (``torch.save`` writes one): a module reached twice, deeper than 64 levels, or more
    than 100,000 tensors is refused (a crafted graph could make the walk exponential)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [(top, "", 0)]
    while stack:
        obj, prefix, depth = stack.pop()
        if id(obj) in seen or depth > _MAX_DEPTH:
            raise PickleRefused(f"the module graph is not a tree of depth <= {_MAX_DEPTH} (at {prefix[:200]!r})")
        seen.add(id(obj))
        state = obj.__dict__.get("_pickled_state")
        if state is None:
            raise PickleRefused(f"{obj.module_class} at {prefix[:200] or 'the top'!r} was never given its state")
        skip = _str_set(state.get("_non_persistent_buffers_set"), prefix)
        for group in ("_parameters", "_buffers"):
            for name, value in _str_dict(state.get(group), prefix, group).items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise PickleRefused(f"{prefix[:200]}{name[:100]} is {_describe(value)}, not a tensor")
                out[prefix + name] = value.detach()
                if len(out) > _MAX_TENSORS:
                    raise PickleRefused(f"more than {_MAX_TENSORS} tensors")
        children = [(n, c) for n, c in _str_dict(state.get("_modules"), prefix, "_modules").items() if c is not None]
        for name, child in reversed(children):  # a stack: the first child is walked first
            if not isinstance(child, InertModule):
                raise PickleRefused(f"submodule {prefix[:200]}{name[:100]} is {_describe(child)}, not a model class")
            stack.append((child, f"{prefix}{name}.", depth + 1))
    return out


def _str_dict(value: Any, prefix: str, what: str) -> dict[str, Any]:
    """A module's ``_parameters`` / ``_buffers`` / ``_modules``: a dict with str keys (or None)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(type(k) is str for k in value):
        raise PickleRefused(f"{what} of {prefix[:200] or 'the top'!r} is {_describe(value)}, not a dict of names")
    return value


def _str_set(value: Any, prefix: str) -> set[str]:
    if value is None:
        return set()
    if not isinstance(value, (set, frozenset)) or not all(type(k) is str for k in value):
        raise PickleRefused(f"the non-persistent buffers of {prefix[:200] or 'the top'!r} are not a set of names")
    return set(value)
