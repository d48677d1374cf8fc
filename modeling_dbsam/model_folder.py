"""Loading a saved model folder (or a Hub id) with one clear error for anything missing, damaged or unreachable.

transformers reports a cut-short ``model.safetensors`` as a ``SafetensorError`` traceback, a broken
``config.json`` as a JSON traceback, and a mistyped folder as an invalid Hub repo id. Every loader in
the project (``dbsam segment``, ``dbsam evaluate``, the pipeline, conversion) checks the folder here
first and raises :class:`ModelFolderError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelFolderError(ValueError):
    """A model folder or Hub id that cannot be loaded; the message names the file and the problem."""


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether ``source`` reads as ``owner/name`` on the Hub and not as a local path."""
    text = str(source)
    return not os.path.exists(text) and not text.startswith((".", "/", "~")) and bool(_HUB_ID.match(text))


def check_model_folder(
    folder: str | os.PathLike, need_processor: bool = True, need_weights: bool = True, need_config: bool = True
) -> Path:
    """Check that ``folder`` holds a loadable config, complete weights and a processor config (each optional)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(
            f"{folder}: no such model folder" + (" (a file, not a folder)" if folder.exists() else "")
        )
    if need_config:
        config = _read_json(folder / "config.json", "save the model with model.save_pretrained(folder)")
        if not isinstance(config, dict) or "model_type" not in config:
            raise ModelFolderError(f"{folder / 'config.json'}: has no model_type; not a transformers model config")
    if need_weights:
        weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
        if not weights:
            raise ModelFolderError(f"{folder}: no model weights ({', '.join(WEIGHT_FILES)})")
        if weights[0].name == "model.safetensors":
            check_safetensors(weights[0])
        elif weights[0].name.endswith(".index.json"):
            index = _read_json(weights[0])
            for shard in sorted(set(index.get("weight_map", {}).values())):
                check_safetensors(folder / shard)
    if need_processor:
        present = [folder / name for name in PROCESSOR_FILES if (folder / name).is_file()]
        if not present:
            raise ModelFolderError(
                f"{folder}: no {' or '.join(PROCESSOR_FILES)}; save the SamProcessor with the model "
                "(processor.save_pretrained(folder))"
            )
        _read_json(present[0])
    return folder


def check_safetensors(path: Path) -> None:
    """A safetensors file must hold its whole header and every tensor byte the header declares."""
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing")
    size = path.stat().st_size
    if size < 8:
        raise ModelFolderError(f"{path}: empty or truncated ({size} bytes): not a safetensors file")
    with open(path, "rb") as stream:
        (header_size,) = struct.unpack("<Q", stream.read(8))
        if 8 + header_size > size:
            raise ModelFolderError(f"{path}: truncated ({size} bytes; its header alone needs {8 + header_size})")
        try:
            header = json.loads(stream.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelFolderError(f"{path}: corrupt safetensors header ({error})") from None
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        raise ModelFolderError(f"{path}: truncated: {size} of {expected} bytes (an interrupted copy or download?)")


def _read_json(path: Path, hint: str = ""):
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing" + (f"; {hint}" if hint else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path}: not valid JSON ({error})") from None


def hub_error(source: str, error: Exception) -> ModelFolderError:
    """One line for a failed Hub download: what was tried and why it failed, without httpx's traceback."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelFolderError(
        f"{source}: not a local folder, and loading it from the Hugging Face Hub failed "
        f"({type(error).__name__}: {reason}); check the path, or the network and the repo id"
    )


def load_model(source: str | os.PathLike, model_class=None, **kwargs):
    """``model_class.from_pretrained(source)`` (default ``AutoModelForMaskGeneration``), checked first.

    A local folder is checked by :func:`check_model_folder`; a Hub id that cannot be fetched
    (offline, unknown repo) and any other loading failure raise :class:`ModelFolderError`.
    """
    if model_class is None:
        from transformers import AutoModelForMaskGeneration as model_class

        import modeling_dbsam

        modeling_dbsam.register()
    hub = is_hub_id(source)
    if not hub:
        check_model_folder(source, need_processor=False)
    return call_loader(source, hub, model_class.from_pretrained, str(source), **kwargs)


def call_loader(source, hub: bool, loader, *args, **kwargs):
    """``loader(*args, **kwargs)`` with its failures as one :class:`ModelFolderError` line about ``source``."""
    from safetensors import SafetensorError

    try:
        return loader(*args, **kwargs)
    except ModelFolderError:
        raise
    except Exception as error:  # the Hub client raises httpx and huggingface_hub errors of many kinds
        if hub:
            raise hub_error(str(source), error) from None
        if not isinstance(error, (OSError, ValueError, RuntimeError, SafetensorError)):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFolderError(f"{source}: cannot be loaded ({type(error).__name__}: {first})") from None
