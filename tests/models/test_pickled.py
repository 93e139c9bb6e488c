"""Weights files are data: no file, declared a TorchXRayVision model or not, runs code when read.

Each attack is a crafted file with a harmless payload (``touch`` of a marker file); each test
asserts the file is refused with one line naming it and that the marker was never made. The
legitimate files (TorchXRayVision's pickled DenseNet, zip and legacy format) load to the same
features in tests/models/test_weights.py.
"""

import io
import os
import pickle
import zipfile

import pytest
import torch

from cxr_ray.config import ModelConfig
from cxr_ray.errors import WeightsError
from cxr_ray.models.pickled import PickleRefused, load_pickled
from cxr_ray.models.registry import build_model
from cxr_ray.models.specs import TXRV_WEIGHTS
from cxr_ray.models.weights import read_state_file

TXRV = "txrv:densenet121-res224-all"


def _system_call(marker) -> bytes:
    """Protocol-0 opcodes that call ``os.system('touch MARKER')`` (posix.system) when unpickled."""
    return b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def _read_declared(path):
    """Read ``path`` as a file declared ``model.weights_format=txrv:...`` (the pickled-model path)."""
    return read_state_file(str(path), "model.weights", txrv=True)


def _zip_file(path, pickle_bytes: bytes, records: dict | None = None, first: tuple | None = None) -> None:
    """A file in torch's zip layout: ``archive/data.pkl`` = ``pickle_bytes`` (after ``first``)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        if first:
            z.writestr(*first)
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/version", b"3\n")
        for name, data in (records or {}).items():
            z.writestr(name, data)


@pytest.mark.parametrize("prefix", [
    pytest.param(b"I0x10\n0", id="hex-INT"),  # base 0 in the C unpickler, rejected by pickletools
    pytest.param(b"S'\xc3\xa9t\xc3\xa9'\n0", id="utf8-STRING"),  # torch.load decodes UTF-8, pickletools ASCII
    pytest.param(b"", id="plain"),
])
def test_opcodes_an_inspector_misreads_cannot_hide_a_call(tmp_path, prefix):
    marker, path = tmp_path / "marker", tmp_path / "weights.pt"
    path.write_bytes(prefix + _system_call(marker))
    with pytest.raises(WeightsError, match=r"weights\.pt refused.*names posix\.system") as e:
        _read_declared(path)
    assert "\n" not in str(e.value)
    assert not marker.exists()


class _Reduce:
    """Pickles as ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_allowed_model_class_cannot_be_called_with_the_files_arguments(tmp_path):
    """TorchXRayVision's DenseNet(weights=..., cache_dir=...) would torch.load(weights_only=False)
    a second file from a folder the first file chooses; its name maps to an inert placeholder."""
    xrv = pytest.importorskip("torchxrayvision")
    marker, attacker = tmp_path / "marker", tmp_path / "attacker"
    attacker.mkdir()
    (attacker / TXRV_WEIGHTS["densenet121-res224-all"].file).write_bytes(_system_call(marker))
    args = (32, (6, 12, 24, 16), 64, 4, 0, 18, 1, "densenet121-res224-all", str(attacker))
    path = tmp_path / "gadget.pt"
    _zip_file(path, pickle.dumps(_Reduce(xrv.models.DenseNet, *args), protocol=2))
    with pytest.raises(WeightsError, match=r"gadget\.pt refused.*DenseNet.*never given its state"):
        _read_declared(path)
    assert not marker.exists()


def test_zip_reads_the_pickle_torch_reads_not_a_decoy(tmp_path):
    """The first record ending in data.pkl need not be the one torch reads: only
    ``<top folder>/data.pkl`` is read, and an archive of two top folders or duplicate names is refused."""
    marker = tmp_path / "marker"
    decoy = pickle.dumps({"w": 1}, protocol=2)
    path = tmp_path / "decoy.pt"
    _zip_file(path, _system_call(marker), first=("archive/a/data.pkl", decoy))
    with pytest.raises(WeightsError, match="names posix.system"):
        _read_declared(path)
    two = tmp_path / "two.pt"
    _zip_file(two, decoy, first=("other/data.pkl", _system_call(marker)))
    with pytest.raises(WeightsError, match="two.pt"):
        _read_declared(two)
    with pytest.raises(PickleRefused, match="one top folder"):
        load_pickled(two.read_bytes())
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_saved_file_that_calls_a_function_is_refused(tmp_path, protocol, zip_format, capsys):
    """STACK_GLOBAL (protocol 4) and GLOBAL both go through the one find_class."""
    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(2, 2), "x": _Reduce(print, "this pickle runs code")}, path,
               pickle_protocol=protocol, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(WeightsError, match=r"names builtins\.print|names __builtin__\.print"):
        _read_declared(path)
    assert "this pickle runs code" not in capsys.readouterr().out


def test_extension_registry_import_is_refused(tmp_path):
    """EXT opcodes import through copyreg's registry; the unpickler still asks find_class."""
    import copyreg

    marker, path = tmp_path / "marker", tmp_path / "ext.pt"
    copyreg.add_extension("posix", "system", 0xF00D)
    try:
        # EXT2 0xF00D, then system('touch MARKER')
        path.write_bytes(b"\x80\x02\x83\x0d\xf0(S'touch " + str(marker).encode() + b"'\ntR.")
        with pytest.raises(WeightsError, match="names posix.system"):
            _read_declared(path)
    finally:
        copyreg.remove_extension("posix", "system", 0xF00D)
    assert not marker.exists()


def test_malformed_truncated_and_oversized_files_are_refused(tmp_path):
    xrv = pytest.importorskip("torchxrayvision")
    good = io.BytesIO()
    torch.save(xrv.models.DenseNet(weights=None), good, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.getvalue()[:-100])
    with pytest.raises(WeightsError, match="cut.pt refused.*cut short|cut.pt refused.*gets"):
        _read_declared(cut)
    trailing = tmp_path / "trailing.pt"
    trailing.write_bytes(good.getvalue() + b"\x00" * 8)
    with pytest.raises(WeightsError, match="bytes after the last storage"):
        _read_declared(trailing)
    # a storage that claims a terabyte: refused before anything is allocated
    huge = tmp_path / "huge.pt"
    big = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(("
           b"X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu\x8a\x06"
           + (1 << 40).to_bytes(6, "little") + b"tQK\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR.")
    _zip_file(huge, big, records={"archive/data/0": b"\x00" * 4})
    with pytest.raises(WeightsError, match="huge.pt"):
        _read_declared(huge)
    with pytest.raises(PickleRefused, match="more than the file holds"):
        load_pickled(huge.read_bytes())
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(WeightsError, match="garbage.pt"):
        _read_declared(garbage)


def test_file_is_opened_once(tmp_path, monkeypatch):
    """What is checked is what is loaded: the file is read through one handle, never reopened."""
    xrv = pytest.importorskip("torchxrayvision")
    path = tmp_path / "model.pt"
    torch.save(xrv.models.DenseNet(weights=None), path)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    import builtins

    real_builtin_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: (opened.append(str(p)), real_builtin_open(p, *a, **k))[1])
    state = _read_declared(path)
    assert opened.count(str(path)) == 1
    assert "features.conv0.weight" in state


def test_non_regular_files_are_refused_without_waiting(tmp_path):
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    with pytest.raises(WeightsError, match="not a regular file"):
        build_model(ModelConfig(weights=str(fifo)))


def test_no_torch_load_with_weights_only_false_in_the_code():
    """The one rule of this module, checked on the source: nothing calls torch.load without
    weights_only=True."""
    import re
    from pathlib import Path

    import cxr_ray

    root = Path(cxr_ray.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for start in (m.end() for m in re.finditer(r"torch\.load\(", text)):
            depth, end = 1, start
            while depth:  # the call's own closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            assert "weights_only=True" in text[start:end], (path, text[start:end])


def test_a_memo_index_cannot_make_the_reader_allocate(tmp_path):
    """LONG_BINPUT 0xFFFFFFF0: the C unpickler grows its memo array to that index (~64 GiB from
    a 43-byte file); the reader's memo is a dict."""
    import resource

    path = tmp_path / "memo.pt"
    path.write_bytes(b"\x80\x02Nr\xf0\xff\xff\xff0ctorchxrayvision.models\nDenseNet\n.")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(WeightsError, match="memo.pt"):
        _read_declared(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def _nested(depth: int) -> list:
    a: list = []
    for _ in range(depth):
        a = [a, a]  # pickled once per level (memo), 2**depth elements when printed
    return a


def test_refusals_never_print_what_the_file_built(tmp_path):
    """A persistent id of nested shared lists is 2**40 items when printed: described by type."""
    import time

    path = tmp_path / "pid.pt"
    body = pickle.dumps(_nested(40), protocol=2)[2:-1]  # without PROTO and STOP
    path.write_bytes(b"\x80\x02" + body + b"Q.")  # BINPERSID on it
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="unknown persistent id: a list of 2 items"):
        _read_declared(path)
    assert time.perf_counter() - start < 5


def test_a_module_graph_that_is_not_a_tree_is_refused(tmp_path):
    """One submodule under two names, 40 levels deep: 2**40 paths to walk; torch.save writes trees."""
    import time

    import torch.nn as nn

    m: nn.Module = nn.Linear(1, 1)
    for _ in range(40):
        m = nn.Sequential(m, m)
    path = tmp_path / "dag.pt"
    torch.save(m, path)
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="not a tree"):
        _read_declared(path)
    assert time.perf_counter() - start < 5


def test_build_cannot_change_what_the_reader_hands_out(tmp_path):
    """BUILD on an allowed rebuild function would set its __defaults__ for every later file
    (e.g. metadata {'neg': True}: every later tensor negated); BUILD is for model classes only."""
    from cxr_ray.models import pickled as pickled_model

    path = tmp_path / "build.pt"
    # BUILD(_rebuild_tensor_v2, (None, {"__defaults__": ({"neg": True},)})): setattr of the slot state
    path.write_bytes(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__"
                     b"}X\x03\x00\x00\x00neg\x88s\x85s\x86b.")
    with pytest.raises(WeightsError, match="BUILD on a function"):
        _read_declared(path)
    assert pickled_model._rebuild_tensor_v2.__defaults__ == (None,)


def test_a_tensor_cannot_reach_past_its_storage(tmp_path):
    """A 16-byte storage read as a 2**20-element tensor: torch would resize the storage
    (uninitialised memory in the weights); refused."""
    long = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(("
            b"X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04"
            b"tQK\x00J\x00\x00\x10\x00\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR.")
    path = tmp_path / "long.pt"
    _zip_file(path, long, records={"archive/data/0": b"\x00" * 16})
    with pytest.raises(PickleRefused, match="reaches past its storage"):
        load_pickled(path.read_bytes())
    with pytest.raises(WeightsError, match="long.pt"):
        _read_declared(path)
