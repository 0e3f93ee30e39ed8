"""Atomic file and directory writes: nothing half-written is ever left under the final name."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from finegrain.errors import ArtifactError, InputError


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_dir() -> Path:
    """finegrain's cache folder, ``$FINEGRAIN_CACHE`` or ``~/.cache/finegrain``: what a later process may
    reuse instead of recomputing (converted tokenizers, GPU tuning results); deleting it is always safe."""
    return Path(os.environ.get("FINEGRAIN_CACHE", Path.home() / ".cache" / "finegrain"))


def check_replaceable(path: Path, overwrite: bool) -> None:
    """An output directory may be written unless it exists; with ``overwrite`` an existing one is
    replaced only when finegrain wrote it (an artifact, a deployment, an export) or it is empty."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise InputError(f"output directory {path} already exists; pass overwrite=True (--overwrite) to replace it")
    if path.is_symlink() or not path.is_dir() or not (is_finegrain_dir(path) or not any(path.iterdir())):
        raise InputError(f"{path} exists and is not a finegrain artifact or deployment (nor an empty directory): "
                         "--overwrite replaces only those; remove it yourself or choose another path")


def _normal_permissions(root: Path) -> None:
    """mkdtemp / mkstemp make 0700 / 0600; an output directory is a deliverable: the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it is renamed to ``path``
    (replacing an existing one only with ``overwrite``); on failure it is removed."""
    path = Path(path)
    check_replaceable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _normal_permissions(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- artifact files: hashing, manifests, member paths ------------------------------------------
# An artifact (or deployment) directory lists each of its files in its manifest with a SHA-256 and a
# byte count. Checksums catch corruption, not tampering (anyone can rewrite them): what keeps a
# stranger's artifact safe is that loading it only ever reads data (graph_json.py's allow-list,
# safetensors) and reads only the files the manifest lists, inside the directory.
MAX_MANIFEST_BYTES = 64 << 20
MAX_NAME_CHARS = 255


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dumps_json(obj) -> str:
    """Deterministic JSON (sorted keys, no NaN) for manifests and graphs."""
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"


def file_records(root: Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"sha256", "bytes"}}`` for the manifest."""
    return {f: {"sha256": sha256_file(root / f), "bytes": (root / f).stat().st_size} for f in sorted(names)}


def member_path(root: Path, name: object) -> Path:
    """``root / name`` for a file name read from a manifest: relative, no ``..``, and resolving
    (symlinks included) inside ``root``; anything else is an ArtifactError."""
    if (not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or "\\" in name or "\0" in name
            or PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in name.split("/"))):
        raise ArtifactError(f"{root}: the manifest lists the file name {str(name)[:80]!r}, which is not a plain "
                            "relative path inside the artifact")
    path = root / name
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise ArtifactError(f"{root}: file {name!r} resolves outside the artifact directory (a symlink?)")
    return path


def read_json_file(path: Path, limit: int = MAX_MANIFEST_BYTES):
    """Parse a JSON file of at most ``limit`` bytes; ArtifactError naming the file otherwise."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise ArtifactError(f"{path}: {size} bytes, more than the {limit} this file may have")
        return json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path} is corrupted or unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def verify_files(root: Path, files: object, required: tuple[str, ...] = ()) -> None:
    """Check every file the manifest lists: a safe name, the listed size (before reading), the
    SHA-256; and that ``required`` files are listed."""
    if not isinstance(files, dict):
        raise ArtifactError(f"{root}: the manifest's 'files' must map file names to their sha256 and bytes")
    for name in required:
        if name not in files:
            raise ArtifactError(f"{root}: the manifest does not list {name}")
    for name, rec in files.items():
        path = member_path(root, name)
        if (not isinstance(rec, dict) or set(rec) != {"sha256", "bytes"} or not isinstance(rec["sha256"], str)
                or not isinstance(rec["bytes"], int) or isinstance(rec["bytes"], bool) or rec["bytes"] < 0):
            raise ArtifactError(f"{root}: the manifest's record of {name} must be {{'sha256': hex, 'bytes': int}}")
        if not path.is_file():
            raise ArtifactError(f"{root}: file {name} listed in the manifest is missing")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise ArtifactError(f"{root}: file {name} has {size} bytes, the manifest says {rec['bytes']} (corrupted "
                                "or replaced)")
        if sha256_file(path) != rec["sha256"]:
            raise ArtifactError(f"{root}: file {name} is corrupted (SHA-256 does not match the manifest)")


EXPORT_MARKER = "finegrain_export.json"  # written into export directories (compressed-tensors) with provenance


def is_finegrain_dir(path: Path) -> bool:
    """A directory finegrain wrote (an artifact, a deployment or an export): its manifest (or the
    export's provenance file) says so."""
    ex = Path(path) / EXPORT_MARKER
    if ex.is_file() and not ex.is_symlink():
        try:
            d = read_json_file(ex)
        except ArtifactError:
            return False
        return isinstance(d, dict) and "finegrain_export" in d
    mf = Path(path) / "manifest.json"
    try:
        m = read_json_file(mf) if mf.is_file() else None
    except ArtifactError:
        return False
    return isinstance(m, dict) and ("finegrain_artifact" in m or "finegrain_tvm_deploy" in m)


def load_listed_tokenizer(root: Path, files: dict, subdir: str = "tokenizer"):
    """The tokenizer under ``root/subdir``, from the files the manifest lists there only: their
    verified bytes are copied into a private directory and loaded from it (no remote code, no
    network). None when the manifest lists no such files."""
    listed = sorted(n for n in files if n.startswith(subdir + "/"))
    if not listed:
        return None
    with tempfile.TemporaryDirectory(prefix="finegrain-tok-") as tmp:
        for name in listed:
            data = member_path(root, name).read_bytes()
            if hashlib.sha256(data).hexdigest() != files[name]["sha256"]:
                raise ArtifactError(f"{root}: file {name} changed while it was read")
            if name.endswith("config.json") and b"auto_map" in data:
                raise ArtifactError(f"{root}: {name} has 'auto_map' (a tokenizer with its own Python code): "
                                    "finegrain never runs code from an artifact")
            dest = Path(tmp) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(Path(tmp) / subdir), local_files_only=True,
                                                 trust_remote_code=False)
        except Exception as e:  # transformers / tokenizers raise many types for a bad file
            raise ArtifactError(f"{root / subdir}: the tokenizer does not load ({type(e).__name__}: "
                                f"{str(e)[:200]})") from None
