"""Loading pipelines: real weights through diffusers' `from_pretrained`, or a tiny pipeline of the
same architecture fabricated offline once, saved with `save_pretrained` and loaded back the same way.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

import torch

from accel import resources
from accel.errors import AccelError
from accel.families import FAMILIES


def resolve_device(device: str = "auto") -> torch.device:
    """The device a run uses; under torchrun, `cuda` (or auto) is the GPU of the process's LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AccelError(f"device={device!r} but torch sees no CUDA device; use device=cpu or device=auto")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def _fabrication_code_digest(architecture: str) -> str:
    """A hash of the fabrication code (the family's module and the shared tiny parts), so a changed
    builder never reuses a pipeline saved by an older one."""
    sources = [Path(inspect.getfile(FAMILIES[architecture].build_tiny)),
               *sorted((Path(__file__).parent / "tiny").glob("*.py"))]
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()


def tiny_pipeline_dir(model) -> Path:
    """Where the tiny pipeline of `model` is (or will be) saved: named by a hash of what defines it."""
    key = json.dumps({"arch": model.architecture, "tiny": dict(model.tiny), "seed": model.tiny_seed,
                      "code": _fabrication_code_digest(model.architecture)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return resources.cache_dir() / "tiny" / f"{model.architecture}-{digest}"


def fabricate_tiny(model) -> Path:
    """Build the tiny pipeline from its seed and save it, unless it is saved already."""
    target = tiny_pipeline_dir(model)
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    pipe = FAMILIES[model.architecture].build_tiny(seed=model.tiny_seed, **dict(model.tiny))
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    pipe.save_pretrained(staging, safe_serialization=True)
    try:
        os.rename(staging, target)  # atomic: a concurrent fabrication of the same pipeline wins or loses whole
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


PACKAGED = Path(__file__).resolve().parent.parent / "toy"  # pipelines trained for this package and shipped in it


def packaged_pipelines() -> list[str]:
    """The names of the pipelines shipped inside the package (model.source=packaged)."""
    return sorted(index.parent.name for index in PACKAGED.glob("*/model_index.json"))


def locate(model) -> Optional[Path]:
    """The local folder holding a model's pipeline (a tiny one is fabricated there first); None when
    the weights are not here but the hub answers (from_pretrained then downloads them); an AccelError
    naming the missing weights and the tiny alternative when offline or the hub does not answer."""
    if model.source == "tiny":
        return fabricate_tiny(model)
    if model.source == "packaged":
        return PACKAGED / model.pretrained
    if Path(model.pretrained).expanduser().is_dir():
        return Path(model.pretrained).expanduser()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model.pretrained, revision=model.revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise AccelError(_missing_weights(model, "HF_HUB_OFFLINE is set")) from None
        unreachable = hub_unreachable()
        if unreachable:
            raise AccelError(_missing_weights(model, f"not in the local Hugging Face cache, and the hub does not "
                                                     f"answer: {unreachable}")) from None
        return None


def hub_unreachable(timeout_s: float = 3.0) -> Optional[str]:
    """Why the Hugging Face Hub cannot be reached from here, found in seconds (diffusers would spend a
    minute retrying); None when it answers."""
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return None
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"


def component_configs(folder: Path, adapter) -> dict[str, dict]:
    """The configs of a saved pipeline's VAE and denoiser, read without loading any weights."""
    read = lambda sub: json.loads((folder / sub / "config.json").read_text())  # noqa: E731
    return {"vae": read("vae"), "denoiser": read(adapter.denoiser_attr)}


def _missing_weights(model, why: str) -> str:
    tiny = f"model={model.architecture}_tiny"
    return (f"the weights of model.pretrained={model.pretrained!r} are not here ({why}): download them with "
            f"`hf download {model.pretrained}` (or point model.pretrained at a local folder), "
            f"or run the embedded tiny pipeline of the same architecture with {tiny}")


def load(model, device: str = "auto"):
    """Load the pipeline a ModelConfig names, on `device`, in the config's dtype."""
    adapter = FAMILIES[model.architecture].adapter
    dtype = getattr(torch, model.dtype)
    pipeline_type = adapter.pipeline_type()
    folder = locate(model)
    location = str(folder) if folder is not None else model.pretrained
    options = {} if model.source in ("tiny", "packaged") else {"revision": model.revision, "variant": model.variant}
    try:
        pipe = pipeline_type.from_pretrained(location, dtype=dtype, use_safetensors=True, **options)
    except (OSError, EnvironmentError) as err:
        raise AccelError(_missing_weights(model, str(err).splitlines()[0])) from None
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(resolve_device(device))
