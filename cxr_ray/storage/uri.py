"""Storage: the one URI-safe helper for local paths and ``s3://`` / ``gs://`` URIs (pyarrow).

Every path that may be a URI -- dataset roots, caches, run and experiment folders, Ray's
checkpoints, scoring output -- goes through these functions, never through ``pathlib`` or
``os.path`` (which turn ``s3://b/x`` into ``s3:/b/x``). A URI keeps its scheme end to end:
Ray hands a checkpoint back as a pyarrow filesystem plus a path inside it (``bucket/key``),
and :func:`checkpoint_uri` turns that pair back into ``s3://bucket/key``.

S3-compatible stores that are not AWS (MinIO, Ceph RGW, on-prem object stores) are reached
through ``AWS_ENDPOINT_URL`` (read by pyarrow), set by the user or from the
``storage.endpoint_url`` config key (:func:`use_endpoint`); ``cluster.init_ray`` passes it on to
every Ray worker. Credentials come from the usual places (environment, ``~/.aws``, the instance
role); they are never copied anywhere.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pyarrow.fs as pafs

from cxr_ray.errors import StorageError

_URI_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "file://")
# pyarrow filesystem type_name -> URI scheme (a checkpoint's filesystem back into a URI)
_FS_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}
ENDPOINT_ENV = "AWS_ENDPOINT_URL"


def is_uri(path: str) -> bool:
    """True for a remote/pyarrow URI such as ``s3://bucket/key``."""
    return str(path).startswith(_URI_SCHEMES)


def _split(uri: str) -> tuple[str, str]:
    """``("s3://", "bucket/key")`` for a URI."""
    scheme, rest = uri.split("://", 1)
    return scheme + "://", rest


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return the pyarrow filesystem and the path inside it for a local path or URI."""
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (ValueError, OSError) as e:
            raise StorageError(f"{path}: not a usable URI: {str(e).splitlines()[0]}") from e
    return pafs.LocalFileSystem(), absolute(path)


def absolute(path: str) -> str:
    """A URI as given (without a trailing ``/``); a local path made absolute, ``~`` expanded."""
    if is_uri(path):
        scheme, rest = _split(path)
        return scheme + (rest.rstrip("/") or rest)
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path parts under a local path or a URI."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    """The folder holding ``path``: ``s3://b/runs/exp`` -> ``s3://b/runs``; local paths made absolute.

    The parent of a bucket (``s3://b``) is refused: there is nothing above it to store in.
    """
    if not is_uri(path):
        return os.path.dirname(absolute(path))
    scheme, rest = _split(path.rstrip("/"))
    if "/" not in rest:
        raise StorageError(f"{path}: a bucket has no parent folder; name a folder inside it")
    return scheme + rest.rsplit("/", 1)[0]


def name(path: str) -> str:
    """The last component of a local path or URI (``s3://b/runs/exp/`` -> ``exp``)."""
    return path.rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else os.path.basename(absolute(path))


def uri(fs: pafs.FileSystem, path: str) -> str:
    """A pyarrow filesystem and a path inside it, back as one string: ``s3://bucket/key`` for
    object stores, the plain path for the local filesystem."""
    kind = fs.type_name
    if kind == "local":
        return path
    scheme = _FS_SCHEMES.get(kind)
    if scheme is None and kind.startswith("py"):  # fsspec through pyarrow's PyFileSystem
        protocol = getattr(getattr(getattr(fs, "handler", None), "fs", None), "protocol", None)
        scheme = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    if not scheme:
        raise StorageError(f"cannot name a location on a {kind!r} filesystem as a URI ({path})")
    return f"{scheme}://{path.lstrip('/')}"


def checkpoint_uri(checkpoint: Any) -> str:
    """The URI of a Ray ``Checkpoint`` (or Train/Tune ``Result``): its own filesystem + path,
    so ``s3://`` survives (``checkpoint.path`` alone is ``bucket/...``)."""
    return uri(checkpoint.filesystem, checkpoint.path)


def full_path(path: str, like: str) -> str:
    """Turn a path inside ``like``'s filesystem back into the form of ``like`` (URI stays URI)."""
    if is_uri(like):
        return f"{_split(like)[0]}{path}"
    return path


def use_endpoint(endpoint_url: str) -> None:
    """Send S3 requests to ``endpoint_url`` (MinIO, Ceph RGW ...) in this process and, through
    ``cluster.init_ray``, in every Ray worker; "" keeps ``$AWS_ENDPOINT_URL`` (or AWS)."""
    if endpoint_url:
        os.environ[ENDPOINT_ENV] = endpoint_url


def check_location(path: str, setting: str) -> None:
    """Fail before any work when ``path`` (the value of ``setting``) is a URI whose bucket does
    not exist or cannot be reached with the credentials at hand; local paths pass."""
    if not is_uri(path) or path.startswith("file://"):
        return
    fs, inner = resolve(path)
    bucket = inner.split("/", 1)[0]
    where = f"{setting}={path}"
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise StorageError(f"{where}: cannot reach bucket {bucket!r}: {str(e).splitlines()[0]} "
                           f"(credentials come from the environment, ~/.aws or the instance role; "
                           f"a non-AWS endpoint from {ENDPOINT_ENV} or storage.endpoint_url)") from e
    if info.type == pafs.FileType.NotFound:
        endpoint = os.environ.get(ENDPOINT_ENV)
        raise StorageError(f"{where}: bucket {bucket!r} does not exist"
                           + (f" at {endpoint}" if endpoint else "") + "; create it first")


def copy_tree(src: str, dst: str) -> None:
    """Replace the folder ``dst`` by a copy of the folder ``src`` (any two locations/URIs)."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    if dst_fs.get_file_info(dst_path).type != pafs.FileType.NotFound:
        dst_fs.delete_dir(dst_path)
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


def read_bytes(path: str) -> bytes:
    """Read a whole file from a local path or URI."""
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file to a local path or URI, creating parent folders."""
    fs, p = resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def count_files(path: str) -> int:
    """How many files there are under folder ``path`` (local or URI; 0 when it does not exist)."""
    fs, p = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return sum(1 for i in infos if i.type == pafs.FileType.File)


def exists(path: str) -> bool:
    """True when a file or folder exists at the local path or URI."""
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def printable(path: str) -> tuple[str, str]:
    """(path as valid UTF-8, "" or the error for a name that is not valid UTF-8).

    ``os`` decodes such bytes to lone surrogates, which Parquet cannot store; they are shown
    as ``\\xNN`` escapes and the row is an error (rename the file to score it).
    """
    try:
        path.encode("utf-8")
        return path, ""
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        return shown, "file name is not valid UTF-8 (shown with \\x escapes); rename the file to score it"


def iter_local(base: str) -> Iterator[tuple[str, str]]:
    """Every visible non-folder entry below the local folder ``base`` as (path, error), one
    folder at a time (names sorted within it), so memory holds one folder's listing; folder
    symlinks are not followed (an error row), like ``find`` without ``-L``."""
    stack = [base]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError as e:
            raise OSError(f"cannot list folder {printable(folder)[0]!r}: {e}") from e
        for entry in reversed(entries):
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                continue
            if entry.is_symlink() and entry.is_dir(follow_symlinks=True):
                shown, error = printable(entry.path)
                yield shown, error or (f"symlink to a folder ({os.readlink(entry.path)!r}), "
                                       f"not followed: list that folder itself to score it")
            else:
                yield printable(entry.path)
        stack += [e.path for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]


def walk_local(base: str) -> list[tuple[str, str]]:
    """:func:`iter_local` as one sorted list (small folders: a dataset's class folder)."""
    return sorted(iter_local(base))
