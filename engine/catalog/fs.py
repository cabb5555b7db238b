"""Filesystem access for catalogs: URIs to pyarrow filesystems, and atomic writes.

Local paths and every scheme pyarrow knows (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``) use
pyarrow's own filesystems; any other scheme goes through fsspec (``memory://``, ``az://``, ...).
For an S3-compatible server set ``AWS_ENDPOINT_URL`` or add ``?endpoint_override=HOST:PORT&scheme=http``.
For a GCS emulator set ``STORAGE_EMULATOR_HOST`` (the variable google-cloud-storage and gcsfs read):
``gs://`` then goes there without credentials.
"""

from __future__ import annotations

import os
import posixpath
import uuid
import warnings
from datetime import timedelta
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.errors import CatalogError, CommitConflict

EMULATOR_RETRY_SECONDS = 30  # how long pyarrow's GCS client retries against STORAGE_EMULATOR_HOST


def resolve_uri(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, root path)`` for a catalog URI or local path."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator and uri.startswith(("gs://", "gcs://")) and "?" not in uri:
        # pyarrow's GCS filesystem ignores the variable and would ask for credentials an
        # emulator neither needs nor checks; its URIs cannot say "anonymous".
        parts = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
        fs = pafs.GcsFileSystem(
            anonymous=True,
            scheme=parts.scheme,
            endpoint_override=parts.netloc,
            # A local emulator's errors are not worth the client's default 15 minutes of retries.
            retry_time_limit=timedelta(seconds=EMULATOR_RETRY_SECONDS),
        )
        return fs, uri.split("://", 1)[1].rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        try:
            import fsspec
            from fsspec.core import url_to_fs
        except ImportError as exc:  # pragma: no cover - fsspec ships with datasets
            raise CatalogError(f"{uri}: unsupported scheme and fsspec is not installed") from exc
        try:
            fs_impl, path = url_to_fs(uri)
        except (ValueError, ImportError) as exc:
            raise CatalogError(f"{uri}: cannot open this URI ({exc})") from None
        assert isinstance(fs_impl, fsspec.AbstractFileSystem)
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs_impl))
    return fs, path.rstrip("/")


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def list_names(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Base names of the files directly in ``directory`` (empty if it does not exist)."""
    selector = pafs.FileSelector(directory, allow_not_found=True)
    return [posixpath.basename(info.path) for info in fs.get_file_info(selector) if info.is_file]


def _local_tmp(path: str) -> str:
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_local(tmp: str, path: str, exclusive: bool) -> None:
    if exclusive:
        # link() fails if the target exists: two writers can never both commit one version.
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise CommitConflict(f"{path} was created by a concurrent writer; retry the operation") from None
        finally:
            os.unlink(tmp)
    else:
        os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _put_if_absent_s3(fs: pafs.S3FileSystem, path: str, data: bytes) -> bool:
    """PUT ``data`` with ``If-None-Match: *``: S3 (and S3-compatible servers that implement
    conditional writes) refuse it when the object exists, so two writers can never both create it.

    pyarrow's S3 filesystem cannot send that header, so this goes through boto3 with the same
    credentials, region and endpoint (read from the filesystem's pickling state, the public way
    pyarrow hands them to Ray workers). Returns False when boto3 is not installed.

    Raises:
        CommitConflict: the object already exists (412) or a concurrent conditional write won (409).
    """
    try:
        import boto3
        from botocore.exceptions import ClientError
    except ImportError:
        return False
    options = fs.__reduce__()[1][0]
    endpoint = options.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{options.get('scheme') or 'https'}://{endpoint}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=options.get("region") or None,
        aws_access_key_id=options.get("access_key") or None,
        aws_secret_access_key=options.get("secret_key") or None,
        aws_session_token=options.get("session_token") or None,
    )
    bucket, _, key = path.partition("/")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412):
            raise CommitConflict(f"{path} was created by a concurrent writer; retry the operation") from None
        raise
    return True


def _put_if_absent_gcs(fs: pafs.GcsFileSystem, path: str, data: bytes) -> bool:
    """Upload ``data`` with the precondition ``ifGenerationMatch=0`` ("no live object of this
    name"): GCS refuses it when the object exists, so two writers can never both create it.

    pyarrow's GCS filesystem cannot send preconditions, so this goes through google-cloud-storage
    with the same endpoint and credentials (read from the filesystem's pickling state, as for
    S3): anonymous, an access token, or else the application default credentials. Returns False
    when google-cloud-storage is not installed.

    Raises:
        CommitConflict: the object already exists (412) or a concurrent write won (409).
    """
    try:
        from google.api_core import exceptions as google_errors
        from google.cloud import storage
    except ImportError:
        return False
    options = fs.__reduce__()[1][0]
    client_options = None
    if options.get("endpoint_override"):
        endpoint = options["endpoint_override"]
        if "://" not in endpoint:
            endpoint = f"{options.get('scheme') or 'https'}://{endpoint}"
        client_options = {"api_endpoint": endpoint}
    project = options.get("project_id") or None
    credentials = None
    if options.get("anonymous"):
        from google.auth.credentials import AnonymousCredentials

        credentials, project = AnonymousCredentials(), project or "<none>"
    elif options.get("access_token"):
        from google.oauth2.credentials import Credentials

        credentials = Credentials(token=options["access_token"])
    if options.get("target_service_account"):
        import google.auth
        from google.auth import impersonated_credentials

        credentials = impersonated_credentials.Credentials(
            source_credentials=credentials or google.auth.default()[0],
            target_principal=options["target_service_account"],
            target_scopes=["https://www.googleapis.com/auth/devstorage.read_write"],
        )
    client = storage.Client(project=project, credentials=credentials, client_options=client_options)
    bucket, _, key = path.partition("/")
    try:
        # The client retries an upload only when a generation precondition makes it idempotent.
        client.bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
    except (google_errors.PreconditionFailed, google_errors.Conflict):
        raise CommitConflict(f"{path} was created by a concurrent writer; retry the operation") from None
    return True


class UnsafeCommitWarning(UserWarning):
    """An exclusive write on a store that cannot make it atomic (only an existence check)."""


def _put_if_absent(fs: pafs.FileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` only if absent, atomically, where the store can; False where it cannot."""
    if isinstance(fs, pafs.S3FileSystem):
        if _put_if_absent_s3(fs, path, data):
            return True
        fix = "install boto3 (pip install 'icm-fusion[s3]') so manifest commits use a conditional PUT"
    elif isinstance(fs, pafs.GcsFileSystem):
        if _put_if_absent_gcs(fs, path, data):
            return True
        fix = (
            "install google-cloud-storage (pip install 'icm-fusion[gcs]') so manifest commits use "
            "a generation precondition"
        )
    else:
        fix = "this store has no conditional writes: run one writer per catalog (see the README)"
    warnings.warn(
        f"{fs.type_name} commit of {path} is not safe for concurrent writers (a writer racing in "
        f"the same instant can be lost): {fix}",
        UnsafeCommitWarning,
        stacklevel=3,
    )
    return False


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes, exclusive: bool = False) -> None:
    """Write ``data`` so readers see the old file or the whole new one, never a part.

    Local: write a hidden temp file, fsync, rename (or hard-link when ``exclusive``). Object
    stores publish an object only when its upload completes, which is already atomic.

    ``exclusive``: fail with :class:`CommitConflict` if ``path`` exists, atomically on a local
    filesystem (hard link), on S3 (conditional PUT, :func:`_put_if_absent_s3`, needs boto3) and on
    GCS (generation precondition, :func:`_put_if_absent_gcs`, needs google-cloud-storage).
    Elsewhere (fsspec stores, S3 or GCS without their client) only an existence check precedes
    the write, which catches a writer that committed earlier, not one racing in the same
    instant; an :class:`UnsafeCommitWarning` says so.
    """
    if is_local(fs):
        tmp = _local_tmp(path)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _publish_local(tmp, path, exclusive)
        return
    if exclusive:
        if _put_if_absent(fs, path, data):
            return
        if exists(fs, path):
            raise CommitConflict(f"{path} was created by a concurrent writer; retry the operation")
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def write_parquet_atomic(
    fs: pafs.FileSystem, path: str, table: pa.Table, row_group_size: int | None = None
) -> None:
    """Write a Parquet file atomically (see :func:`write_bytes_atomic`)."""
    if is_local(fs):
        tmp = _local_tmp(path)
        pq.write_table(table, tmp, row_group_size=row_group_size)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _publish_local(tmp, path, exclusive=False)
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs, row_group_size=row_group_size)


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        pass


def upload_dir(
    local_dir: str | os.PathLike, uri: str, overwrite: bool = False, last: str | None = None
) -> str:
    """Copy the files directly in ``local_dir`` to the directory ``uri`` (a local path or an object
    store prefix); ``last`` (e.g. the file readers look for first) is written after the others,
    so a reader that finds it finds the rest whole. Returns the destination path.

    Raises:
        CatalogError: ``uri`` already holds files and ``overwrite`` is false.
    """
    fs, root = resolve_uri(uri)
    if list_names(fs, root) and not overwrite:
        raise CatalogError(f"{uri} already exists; choose a new location or pass overwrite")
    names = sorted(os.listdir(local_dir), key=lambda name: (name == last, name))
    for name in names:
        with open(os.path.join(local_dir, name), "rb") as handle:
            write_bytes_atomic(fs, join(root, name), handle.read())
    return root
