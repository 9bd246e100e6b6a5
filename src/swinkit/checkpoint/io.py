"""Reading and writing checkpoint files safely.

``.pth`` / ``.bin`` files are read with ``torch.load(weights_only=True)`` only: a pickle that
would need to run code is refused. safetensors files are recognised by their header, whatever
their name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

# Top-level keys under which training scripts nest the weights (official: "model", timm: "state_dict").
_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")
# Prefixes added by DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The weight files of a Hugging Face model directory, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not fit the model it is loaded into."""


def file_kind(path: Path) -> str:
    """What a file holds by its first bytes: ``safetensors``, ``torch`` (a zip or pickle) or ``unknown``."""
    with path.open("rb") as f:
        head = f.read(16)
    # safetensors first: its first byte is the low byte of the header's length, which is 0x80 (a
    # pickle's first byte) for one file in 256; a pickle or zip never has "{" at byte 8.
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < path.stat().st_size:
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    return "unknown"


def missing_file(path: str | os.PathLike, what: str = "") -> FileNotFoundError:
    """The error for ``path`` not being there, a symbolic link that leads nowhere named as one;
    ``what`` names the kind of file (``checkpoint file``)."""
    path = Path(path)
    if path.is_symlink():
        target = os.readlink(path)
        return FileNotFoundError(f"{path} is a symbolic link to {target} that leads to no file (missing, or a loop)")
    return FileNotFoundError(f"{what} {path} does not exist".lstrip())


def _check_path(path: Path) -> None:
    if not path.exists():
        raise missing_file(path, "checkpoint file")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory; pass a checkpoint file (.pth, .bin or .safetensors) or a Hugging Face "
            f"model directory (config.json with {' or '.join(HF_WEIGHT_FILES)})"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes)")


def _load_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except Exception as error:  # safetensors raises its own SafetensorError, not a subclass we can name
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    return tensors, metadata


def _load_pickle(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol before refusing it below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "GLOBAL" in message or "global" in message:
            culprit = next((line.strip() for line in message.splitlines() if "GLOBAL" in line), "")
            raise CheckpointError(
                f"refusing to load {path}: it is a pickle that needs to import and run code to load "
                f"({culprit or 'an unsupported global'}). swinkit reads .pth/.bin files with "
                "torch.load(weights_only=True) so that a checkpoint can never execute code. If you trust "
                "the file, re-save only its tensors (e.g. torch.save(state_dict, ...)) or convert it to "
                ".safetensors, then load that."
            ) from None
        if "Unsupported operand" in message:  # an opcode torch.save never writes: pickle.dump's own file
            raise CheckpointError(
                f"refusing to load {path}: it is a plain pickle (pickle.dump's, not torch.save's), which swinkit "
                "does not read, as such a file can run code when loaded. If you trust it, load it yourself and "
                "re-save its tensors with torch.save(state_dict, ...) or as .safetensors, then load that."
            ) from None
        raise CheckpointError(f"{path} is not a valid PyTorch checkpoint (corrupt or not a checkpoint)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint (truncated or corrupt?): {first}"
        ) from None


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> StateDict:
    """Find the state dict inside a training checkpoint and strip DDP / compile prefixes."""
    while isinstance(obj, Mapping):
        wrapper = next((key for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict of tensors")
    non_tensors = [key for key, value in obj.items() if not isinstance(value, Tensor)]
    if non_tensors:
        raise CheckpointError(
            f"{source} is not a state dict: entries {non_tensors[:5]} are not tensors "
            "(expected a mapping of parameter names to tensors, or {'model': state_dict})"
        )
    state_dict = {}
    for key, value in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state_dict[key] = value
    return state_dict


def _read_file(path: Path) -> tuple[StateDict, dict[str, str]]:
    _check_path(path)
    kind = file_kind(path)
    if kind == "safetensors":
        tensors, metadata = _load_safetensors(path)
        return unwrap_state_dict(tensors, str(path)), metadata
    if kind == "torch":
        _refuse_program(path)
        obj = _load_pickle(path)
        if isinstance(obj, Mapping) and isinstance(obj.get("spec"), str) and "optimizer" in obj:
            return _dense_run_checkpoint(obj, path)
        if isinstance(obj, Mapping) and isinstance(obj.get("model_config"), Mapping) and "optimizer" in obj:
            return _training_run_checkpoint(obj, path)
        return unwrap_state_dict(obj, str(path)), _openmmlab_metadata(obj)
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path} is an ONNX file, not a checkpoint: {EXPORTED_FILE_ADVICE}")
    truncated = _truncated_safetensors(path)
    if truncated:
        raise CheckpointError(f"{path} is a truncated safetensors file: {truncated}")
    raise CheckpointError(
        f"{path} is not a checkpoint: it is neither a PyTorch file (.pth/.bin, zip or pickle) nor a safetensors file"
    )


EXPORTED_FILE_ADVICE = (
    "predict and eval run an exported file (segment / detect predict and eval a dense one); here, give the "
    "checkpoint it was exported from"
)


def _refuse_program(path: Path) -> None:
    """A torch.export program (a ``.pt2`` zip archive) is no checkpoint: said as such, not as a
    corrupt PyTorch file (torch's reader finds no ``data.pkl`` in it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # a pickle, or a damaged zip: torch.load says what it is
    if any(name.endswith(("/archive_format", "/models/model.json")) for name in names):
        raise CheckpointError(f"{path} is a torch.export program (.pt2), not a checkpoint: {EXPORTED_FILE_ADVICE}")


def _truncated_safetensors(path: Path) -> str:
    """Why ``path`` looks like the start of a safetensors file cut short (its header's length, then
    ``{``, with fewer bytes after it than the length says), or ``""``."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return ""
    (header_len,) = struct.unpack("<Q", head[:8])
    size = path.stat().st_size
    if 8 + header_len <= size:
        return ""
    return f"its header says {header_len} bytes of description, but the file has {size} bytes in all (copied in part?)"


def _dense_run_checkpoint(obj: Mapping[str, Any], path: Path) -> tuple[StateDict, dict[str, str]]:
    """A dense training run's ``checkpoint-last.pt`` holds its model's description (``spec``) beside
    the weights: read as the model file the run writes (file keys, the spec as metadata), so the
    dense commands take the checkpoint of a run under way and the classifier commands refuse it."""
    from ..dense.weights import DenseSpec, to_file_keys  # (the dense package reads files through here)

    spec = DenseSpec.from_json(obj["spec"], str(path))
    return to_file_keys(unwrap_state_dict(obj["model"], str(path)), spec.task), {"swinkit_dense": obj["spec"]}


def _training_run_checkpoint(obj: Mapping[str, Any], path: Path) -> tuple[StateDict, dict[str, str]]:
    """A ``swinkit train`` run's ``checkpoint-last.pt``: its weights with the model's config
    (preprocessing too) and class names as metadata, as the run's ``model-*.safetensors`` hold them
    (read as a bare state dict, a run under way was predicted with ImageNet's statistics and
    class indices)."""
    metadata = {"swinkit_config": json.dumps(dict(obj["model_config"]))}
    classes = obj.get("classes")
    if isinstance(classes, (list, tuple)) and all(isinstance(name, str) for name in classes):
        metadata["class_names"] = json.dumps(list(classes))
    return unwrap_state_dict(obj, str(path)), metadata


def _openmmlab_metadata(obj: Any) -> dict[str, str]:
    """The class names an OpenMMLab (mmdet / mmseg) checkpoint keeps in ``meta.CLASSES``, as ``class_names``."""
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    names = meta.get("CLASSES") if isinstance(meta, Mapping) else None
    if isinstance(names, (list, tuple)) and names and all(isinstance(name, str) for name in names):
        return {"class_names": json.dumps(list(names))}
    return {}


def _read_hf_directory(path: Path) -> tuple[StateDict, dict[str, str]] | None:
    """A Hugging Face model directory: its weights (sharded or not) and ``config.json`` as ``hf_config``."""
    files = []
    for name in HF_WEIGHT_FILES:
        index = path / f"{name}.index.json"
        if (path / name).is_file():
            files = [path / name]
        elif index.is_file():
            files = [path / shard for shard in _shards(index)]
        if files:
            break
    if not files:
        return None
    state_dict: StateDict = {}
    for file in files:
        state_dict.update(_read_file(file)[0])
    config = path / "config.json"
    metadata = {"hf_config": config.read_text()} if config.is_file() else {}
    return state_dict, metadata


def _shards(index: Path) -> list[str]:
    """The shard files a Hugging Face ``*.index.json`` names, once its ``weight_map`` maps tensor
    names to file names."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:  # TypeError: not a JSON object
        raise CheckpointError(f"{index} is not a valid shard index: {error!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise CheckpointError(
            f"{index} is not a valid shard index: its weight_map must map tensor names to shard file names"
        )
    return sorted(set(weight_map.values()))


def read_checkpoint(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """Read a ``.pth`` / ``.bin`` / ``.safetensors`` file or a Hugging Face model directory.

    Returns the state dict and the metadata: a safetensors file's own, ``{"hf_config": text}`` for a
    directory with a ``config.json`` (or its weight file, read as the directory), ``{"class_names":
    JSON list}`` for an OpenMMLab file naming its classes (``meta.CLASSES``), else ``{}``.
    """
    path = Path(path)
    if path.is_dir():
        found = _read_hf_directory(path)
        if found is not None:
            return found
    state_dict, metadata = _read_file(path)
    config = path.parent / "config.json"
    if path.name in HF_WEIGHT_FILES and config.is_file() and "hf_config" not in metadata:
        metadata = {**metadata, "hf_config": config.read_text()}
    return state_dict, metadata


def check_folder(path: str | os.PathLike) -> Path:
    """Refuse now what :func:`make_folder` would refuse later (a file in the way, a folder the system
    will not make), leaving nothing behind: a folder made to try is removed again, so that a run
    refused later, say for its checkpoint, leaves no empty folder."""
    path = _no_file_in_the_way(Path(path))
    missing = [p for p in (path, *path.parents) if not (p.exists() or p.is_symlink())]
    make_folder(path)
    for made in missing:  # the deepest first
        with contextlib.suppress(OSError):
            made.rmdir()
    return path


def make_folder(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` and its parents; a file where a folder must be is refused by name."""
    path = _no_file_in_the_way(Path(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # no permission, a read-only or virtual file system
        raise ValueError(f"cannot make the folder {path}: {error.strerror or error}") from None
    return path


def _no_file_in_the_way(path: Path) -> Path:
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        where = "it" if existing == path else existing
        raise ValueError(f"cannot make the folder {path}: {where} is a file, not a folder")
    return path


def writable_file(path: str | os.PathLike) -> Path:
    """``path`` ready to be written: its folder made, and refused by name if it is a folder itself."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the name of the file to write")
    make_folder(path.parent)
    return path


def export_destination(path: str | os.PathLike) -> Path:
    """``path`` for an export, checked before its minutes of tracing: its folder exists, and it is
    not a folder itself."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: {path.parent} is a file, not a folder")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the name of the file to write")
    return path


def _file_mode() -> int:
    """The permissions ``open()`` gives a new file here: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # read once, at import: setting the umask is process-wide


@contextlib.contextmanager
def staging(path: str | os.PathLike) -> Iterator[Path]:
    """A path named as ``path`` in a new folder beside it, to write ``path`` at in one step.

    When the block ends, what was written there replaces its namesake beside ``path`` at once: first
    any file the writer put beside the temporary one (an ONNX file's external weights,
    ``<name>.data``, which the model file names), then the file itself, so that it never names a file
    not yet there. When the block raises, nothing is moved and the folder is removed: ``path`` stays
    as it was, and a crash never leaves a half-written file at it.
    """
    path = writable_file(path)
    # The temporary file has the destination's name, in a folder of its own beside it: torch's zip
    # archives (torch.save, torch.export.save) name their top folder after the file they write, and
    # an ONNX file names its weights file after itself.
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as error:  # named by the file asked for, not the temporary one
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None
    temporary = folder / path.name
    try:
        yield temporary
        companions = sorted(item for item in folder.iterdir() if item != temporary and item.is_file())
        for written in [*companions, temporary]:
            if written.is_file():  # as open() makes a file: safetensors' writer makes it private (0600)
                os.chmod(written, FILE_MODE)
            _sync(written)  # on disk before its name is: a power cut leaves the old file, not an empty one
            os.replace(written, path.with_name(written.name))
        _sync(path.parent)  # the new names too
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _sync(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to the disk, where the system allows it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on Windows: its entries are written through there
        return
    try:
        os.fsync(descriptor)
    except OSError:  # a file system without fsync (some network or virtual ones)
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)`` then move the file onto ``path`` (:func:`staging`)."""
    with staging(path) as temporary:
        write(str(temporary))


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what :func:`atomic_write` calls for ``path`` left behind when killed mid-write (its
    folder beside ``path``, holding at most a partial ``path.name``); returns the folders removed.
    Call it where no other process is writing ``path`` (a run resuming in its own folder)."""
    path = Path(path)
    removed = []
    for folder in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if folder.is_dir() and all(item.name == path.name for item in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def save_safetensors(state_dict: StateDict, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Write tensors (made contiguous, shared storage broken) and string metadata atomically."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous().clone() for key, value in state_dict.items()}
    text = {key: value if isinstance(value, str) else json.dumps(value) for key, value in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=text))


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
