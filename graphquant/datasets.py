"""Text for evaluation and calibration, and its cutting into token windows.

Texts by name (:func:`load_text`):

- ``"wikitext"`` / ``"wikitext2"``: WikiText-2 raw. The **test** split ships with graphquant
  (``graphquant/data/wikitext2_test.txt``, CC BY-SA 3.0, see ``graphquant/data/ATTRIBUTION.md``). The
  **valid** split is read from ``<shared>/data/text/wikitext-2-raw/wiki.valid.raw`` when that exists.
  The text is rebuilt as the usual ``"\\n\\n".join(rows)`` of the Hugging Face ``wikitext-2-raw-v1`` rows.
- ``"pileval"``: not shipped; pass ``path=`` a ``.jsonl`` file with a ``"text"`` field per line (e.g. the
  decompressed ``val.jsonl.zst`` of ``mit-han-lab/pile-val-backup``) or a ``.txt`` file.
- ``"gutenberg"``: the three held-out books of ``<shared>/data/text/gutenberg-valid`` (the evaluation text of
  gq-llama-20m), joined by blank lines. :func:`gutenberg_eval_windows` gives that model's exact protocol.
- any path to a ``.txt`` (or ``.jsonl``) file.

``<shared>`` is ``$GRAPHQUANT_SHARED`` when set, else the ``shared`` folder next to the repository checkout.

Tokenizers: a Hugging Face tokenizer or :class:`graphquant.models.llama2c.Llama2cTokenizer`. Streams are
encoded without the tokenizer's automatic special tokens; ``bos=True`` puts one BOS id at the very start
(what ``tokenizer(text)`` does for Llama-style tokenizers, the common WikiText-2 protocol), ``eos=True``
appends one EOS id.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .errors import CalibrationError

__all__ = ["DatasetNotFoundError", "shared_dir", "load_text", "gutenberg_books", "encode", "tokenize_stream",
           "cut_windows", "tokenize_windows", "calibration_batches", "gutenberg_eval_stream", "gutenberg_eval_windows",
           "load_sentences", "sentence_batches", "PACKAGE_DATA"]

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
WIKITEXT_TEST = PACKAGE_DATA / "wikitext2_test.txt"
WIKITEXT_VALID = PACKAGE_DATA / "wikitext2_valid.txt"
GUTENBERG_SEPARATOR = "\x1e"  # ASCII record separator between the books of gutenberg_valid.txt


class DatasetNotFoundError(CalibrationError, FileNotFoundError):
    """A named text is not available on this machine (not shipped, no local copy); the message says where to put it."""


def shared_dir() -> Path | None:
    """The read-only ``shared`` folder (models and texts): ``$GRAPHQUANT_SHARED`` or ``<repo>/../shared``."""
    env = os.environ.get("GRAPHQUANT_SHARED")
    cand = Path(env).expanduser() if env else Path(__file__).resolve().parents[1].parent / "shared"
    return cand if cand.is_dir() else None


def _shared_file(*parts: str) -> Path | None:
    root = shared_dir()
    if root is None:
        return None
    f = root.joinpath("data", *parts)
    return f if f.is_file() else None


def _wikitext_rows_to_text(raw: str) -> str:
    """The HF ``wikitext-2-raw-v1`` rows (``line + "\\n"`` or ``""`` for blank lines) joined with ``"\\n\\n"``."""
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return "\n\n".join(line + "\n" if line.strip() else "" for line in lines)


def _read_text_file(path: Path) -> str:
    if path.suffix == ".zst":
        raise DatasetNotFoundError(f"{path} is zstd-compressed; decompress it first (`zstd -d {path}`) and pass "
                                   "the .jsonl file")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError) as e:
                    raise CalibrationError(f"{path}:{n} is not a JSON object with a \"text\" field "
                                           f"({type(e).__name__}: {e})") from e
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def gutenberg_books() -> list[str]:
    """The three held-out books of ``<shared>/data/text/gutenberg-valid/gutenberg_valid.txt``, in file order."""
    f = _shared_file("text", "gutenberg-valid", "gutenberg_valid.txt")
    if f is None:
        raise DatasetNotFoundError("the Gutenberg validation text is not available: expected "
                                   "<shared>/data/text/gutenberg-valid/gutenberg_valid.txt (set GRAPHQUANT_SHARED "
                                   "to the folder that holds data/)")
    return f.read_text(encoding="utf-8").split(GUTENBERG_SEPARATOR)


def load_text(name_or_path: str | Path, split: str = "test", path: str | Path | None = None) -> str:
    """The text of a named dataset (see the module docstring) or of a text file.

    ``split`` applies to WikiText-2 (``"test"``, shipped; ``"valid"``/``"validation"``, from ``<shared>``).
    ``path`` is the local file for ``"pileval"`` (and overrides the location of any named text).
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DatasetNotFoundError(f"no such file: {p}")
        text = _read_text_file(p)
        return _wikitext_rows_to_text(text) if str(name_or_path).lower().startswith("wikitext") else text
    name = str(name_or_path)
    key = name.lower().replace("-", "").replace("_", "")
    if key in ("wikitext", "wikitext2", "wikitext2raw"):
        if split == "test":
            return _wikitext_rows_to_text(WIKITEXT_TEST.read_text(encoding="utf-8"))
        if split in ("valid", "validation"):
            f = WIKITEXT_VALID if WIKITEXT_VALID.is_file() else _shared_file("text", "wikitext-2-raw", "wiki.valid.raw")
            if f is None:
                raise DatasetNotFoundError(
                    "the WikiText-2 valid split is missing from this installation; expected it at "
                    "<shared>/data/text/wikitext-2-raw/wiki.valid.raw (set GRAPHQUANT_SHARED), or pass "
                    "path=... to a copy of wiki.valid.raw")
            return _wikitext_rows_to_text(f.read_text(encoding="utf-8"))
        raise DatasetNotFoundError(f"WikiText-2 split {split!r} is not available: use 'test' (shipped) or 'valid' "
                                   "(from the shared data folder); the train split is not included")
    if key == "pileval":
        raise DatasetNotFoundError(
            "pileval is not shipped with graphquant and cannot be downloaded here: pass path=... to a local .jsonl "
            "file with one {\"text\": ...} object per line (e.g. the decompressed val.jsonl.zst of "
            "mit-han-lab/pile-val-backup) or to a .txt file")
    if key == "gutenberg":
        return "\n\n".join(gutenberg_books())
    p = Path(name).expanduser()
    if p.is_file():
        return _read_text_file(p)
    raise DatasetNotFoundError(f"unknown dataset {name!r}: not a file, and not one of 'wikitext', 'pileval' "
                               "(with path=...), 'gutenberg'")


def encode(tokenizer, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of ``text`` without the tokenizer's own special tokens, plus BOS/EOS as asked."""
    from .models.llama2c import Llama2cTokenizer

    if tokenizer is None:
        raise CalibrationError("a tokenizer is needed to turn text into token ids; the model was loaded without "
                               "one: pass tokenizer=... (e.g. AutoTokenizer.from_pretrained(folder))")
    if isinstance(tokenizer, Llama2cTokenizer):
        return tokenizer.encode(text, bos=bos, eos=eos)
    try:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    except TypeError:  # not an HF tokenizer: a plain encode(text) -> ids
        ids = tokenizer.encode(text)
    ids = list(ids)
    if bos:
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise CalibrationError(f"bos=True but {type(tokenizer).__name__} has no BOS token; pass bos=False")
        ids.insert(0, tokenizer.bos_token_id)
    if eos:
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise CalibrationError(f"eos=True but {type(tokenizer).__name__} has no EOS token; pass eos=False")
        ids.append(tokenizer.eos_token_id)
    return ids


def tokenize_stream(tokenizer, text: str, bos: bool = True, eos: bool = False) -> torch.Tensor:
    """The whole text as one 1-D LongTensor token stream (see :func:`encode`)."""
    return torch.tensor(encode(tokenizer, text, bos=bos, eos=eos), dtype=torch.long)


def cut_windows(stream: torch.Tensor, seqlen: int, num_windows: int | None = None,
                what: str = "the text") -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows of a 1-D stream from offset 0, tail dropped: ``(N, seqlen)``.

    ``num_windows`` keeps the first N; asking for more than the stream holds is a :class:`CalibrationError`.
    """
    if seqlen < 2:
        raise CalibrationError(f"seqlen must be at least 2 (one prediction per window), got {seqlen}")
    stream = torch.as_tensor(stream, dtype=torch.long).reshape(-1)
    available = stream.numel() // seqlen
    if num_windows is not None and num_windows < 1:
        raise CalibrationError(f"num_windows must be positive, got {num_windows}")
    n = available if num_windows is None else num_windows
    if n > available or n < 1:
        asked = f"{n} were requested" if num_windows is not None else "at least one is needed"
        raise CalibrationError(f"{what} gives {stream.numel():,} tokens, i.e. {available} windows of {seqlen} "
                               f"tokens, but {asked}; lower the number of windows or the sequence length, or use "
                               "a longer text")
    return stream[: n * seqlen].reshape(n, seqlen).clone()


def tokenize_windows(tokenizer, text: str, seqlen: int, num_windows: int | None = None, bos: bool = True,
                     eos: bool = False) -> torch.Tensor:
    """Tokenize ``text`` as one stream and cut it into non-overlapping ``seqlen`` windows from offset 0.

    Returns a LongTensor ``(N, seqlen)``: all full windows, or the first ``num_windows``.
    """
    return cut_windows(tokenize_stream(tokenizer, text, bos=bos, eos=eos), seqlen, num_windows)


def calibration_batches(tokenizer, dataset: str = "wikitext", num_calib_data: int = 16, seq_len: int = 512,
                        batch_size: int = 1, split: str | None = None, seed: int | None = 0,
                        path: str | Path | None = None, bos: bool | None = None) -> list[dict[str, torch.Tensor]]:
    """Calibration data: a list of ``{"input_ids": LongTensor(batch, seq_len)}`` dicts.

    The text (``dataset``, ``split``, ``path`` as in :func:`load_text`) is tokenized as one stream (with a
    BOS at the start when the tokenizer has one, or as ``bos`` says) and cut into non-overlapping ``seq_len`` windows. With an integer ``seed`` the
    ``num_calib_data`` windows are drawn without replacement from all of them (seeded, so repeatable; returned
    in stream order); with ``seed=None`` they are the first ``num_calib_data`` windows. They are grouped
    into batches of ``batch_size`` (the last batch may be smaller).

    ``split=None`` picks WikiText-2 **valid** when it is available, else the shipped **test** split with a
    warning (the evaluation text then overlaps the calibration text).
    """
    if num_calib_data < 1 or batch_size < 1:
        raise CalibrationError(f"num_calib_data and batch_size must be positive, got {num_calib_data} and "
                               f"{batch_size}")
    is_wikitext = str(dataset).lower().replace("-", "").replace("_", "").startswith("wikitext")
    if split is None:
        split = "test"
        if is_wikitext and path is None:
            if WIKITEXT_VALID.is_file() or _shared_file("text", "wikitext-2-raw", "wiki.valid.raw") is not None:
                split = "valid"
            else:
                warnings.warn("graphquant: calibrating on the shipped WikiText-2 *test* split (the valid split is "
                              "not available), which is also the default evaluation text; pass split='valid' with "
                              "path=... to a copy of wiki.valid.raw to keep them apart", stacklevel=2)
    text = load_text(dataset, split=split, path=path)
    if bos is None:
        bos = getattr(tokenizer, "bos_token_id", None) is not None
    stream = tokenize_stream(tokenizer, text, bos=bos)
    what = f"{dataset} ({split})" if is_wikitext else str(path or dataset)
    windows = cut_windows(stream, seq_len, None, what=what)
    if num_calib_data > windows.shape[0]:
        cut_windows(stream, seq_len, num_calib_data, what=what)  # raises the explanatory error
    if seed is None:
        chosen = torch.arange(num_calib_data)
    else:
        g = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(windows.shape[0], generator=g)[:num_calib_data].sort().values
    picked = windows[chosen]
    return [{"input_ids": picked[i:i + batch_size]} for i in range(0, num_calib_data, batch_size)]


def gutenberg_eval_stream(tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """gq-llama-20m's validation stream: the three books each encoded as ``<s> book </s>``, concatenated.

    603,347 tokens with gq-llama-20m's tokenizer. With ``max_tokens``, books are tokenized only until the
    stream is at least that long (the prefix is the same).
    """
    parts: list[int] = []
    for book in gutenberg_books():
        parts.extend(encode(tokenizer, book, bos=True, eos=True))
        if max_tokens is not None and len(parts) >= max_tokens:
            break
    return torch.tensor(parts, dtype=torch.long)


def gutenberg_eval_windows(tokenizer, seqlen: int = 512, num_windows: int | None = None) -> torch.Tensor:
    """gq-llama-20m's evaluation protocol: ``(N, seqlen)`` windows of :func:`gutenberg_eval_stream`.

    Non-overlapping windows from offset 0, tail dropped: 1178 windows of 512 tokens (all of them by default,
    or the first ``num_windows``, for which only the books needed are tokenized). Score each with
    ``model(ids, labels=ids).loss`` and take ``exp(mean window loss)``, as
    :func:`graphquant.eval.perplexity` does.
    """
    need = None if num_windows is None else num_windows * seqlen
    return cut_windows(gutenberg_eval_stream(tokenizer, need), seqlen, num_windows,
                       what="the Gutenberg validation stream")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def load_sentences(name_or_path: str | Path = "wikitext", n: int = 256, split: str = "test", min_words: int = 6,
                   path: str | Path | None = None) -> list[str]:
    """The first ``n`` sentences of a text with at least ``min_words`` words (WikiText headings skipped).

    For embedding-fidelity checks of encoders (e.g. all-MiniLM). Sentences are split at ``. ! ?`` followed by
    a capitalised word; deterministic.
    """
    text = load_text(name_or_path, split=split, path=path)
    out: list[str] = []
    for para in text.split("\n"):
        para = para.strip()
        if not para or (para.startswith("=") and para.endswith("=")):
            continue
        for sent in _SENTENCE_END.split(para):
            if len(sent.split()) >= min_words:
                out.append(sent)
                if len(out) == n:
                    return out
    raise CalibrationError(f"{name_or_path} has only {len(out)} sentences of {min_words}+ words; {n} were requested")


def sentence_batches(tokenizer, sentences: Sequence[str], batch_size: int = 32, max_length: int = 128
                     ) -> list[dict[str, torch.Tensor]]:
    """Padded HF-tokenizer batches (``input_ids``, ``attention_mask``, ...) of sentences, for encoders."""
    if tokenizer is None:
        raise CalibrationError("sentence_batches needs a tokenizer")
    return [dict(tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]
