"""Load Karpathy's llama2.c checkpoints (legacy "version 0" export) as a transformers ``LlamaForCausalLM``.

The file is a header of 7 little-endian int32 values ``dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len`` followed by float32 arrays in this order (PyTorch ``nn.Linear`` layout, row major)::

    token_embedding [vocab, dim]        rms_att [L, dim]
    wq [L, n_heads*hd, dim]             wk, wv [L, n_kv_heads*hd, dim]      wo [L, dim, n_heads*hd]
    rms_ffn [L, dim]                    w1, w3 [L, hidden, dim]             w2 [L, dim, hidden]
    rms_final [dim]                     freq_cis_real, freq_cis_imag [seq_len, hd/2]  (legacy, unused)
    wcls [vocab, dim]                   only when vocab_size < 0 (untied classifier)

A positive ``vocab_size`` means the classifier shares the token embedding (tied weights).

RoPE layout: llama2.c rotates the interleaved pairs ``(2i, 2i+1)`` of each head with frequency ``i``;
transformers' Llama rotates ``(i, i + hd/2)`` ("rotate half"). Permuting the rows of ``wq`` and ``wk``
inside every head to ``[0, 2, 4, ..., hd-2, 1, 3, ..., hd-1]`` maps one onto the other; ``q·k`` is
unchanged because q and k get the same permutation, so attention is exactly the same function.

:class:`Llama2cTokenizer` reads llama2.c's ``tok*.bin`` vocabulary and encodes like llama2.c's ``run.c``.
"""
from __future__ import annotations

import heapq
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = ["Llama2cHeader", "read_header", "is_llama2c_checkpoint", "find_llama2c_files", "load_llama2c",
           "load_llama2c_state", "llama2c_config", "Llama2cTokenizer", "rope_permutation"]

HEADER_BYTES = 7 * 4
_LLAMA2C_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export versions 1 and 2, not supported here


class Llama2cHeader:
    """The 7-int header of a llama2.c checkpoint, plus the sizes derived from it."""

    def __init__(self, dim: int, hidden_dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab_size: int,
                 seq_len: int):
        self.dim, self.hidden_dim, self.n_layers = dim, hidden_dim, n_layers
        self.n_heads, self.n_kv_heads, self.seq_len = n_heads, n_kv_heads, seq_len
        self.shared_classifier = vocab_size > 0
        self.vocab_size = abs(vocab_size)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def plausible(self) -> bool:
        """True when the numbers look like a real llama2.c header (used to recognise the format)."""
        vals = (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size,
                self.seq_len)
        return (all(0 < v < (1 << 20) for v in vals) and self.dim % self.n_heads == 0
                and self.n_heads % self.n_kv_heads == 0 and self.head_dim % 2 == 0)

    def array_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the float32 arrays that follow the header, in file order."""
        d, h, L, hd = self.dim, self.hidden_dim, self.n_layers, self.head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        shapes = [("token_embedding", (self.vocab_size, d)), ("rms_att", (L, d)), ("wq", (L, q, d)),
                  ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, q)), ("rms_ffn", (L, d)),
                  ("w1", (L, h, d)), ("w2", (L, d, h)), ("w3", (L, h, d)), ("rms_final", (d,)),
                  ("freq_cis_real", (self.seq_len, hd // 2)), ("freq_cis_imag", (self.seq_len, hd // 2))]
        if not self.shared_classifier:
            shapes.append(("wcls", (self.vocab_size, d)))
        return shapes

    def expected_bytes(self) -> int:
        return HEADER_BYTES + 4 * sum(int(np.prod(s)) for _, s in self.array_shapes())

    def __repr__(self) -> str:
        return (f"Llama2cHeader(dim={self.dim}, hidden_dim={self.hidden_dim}, n_layers={self.n_layers}, "
                f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, vocab_size={self.vocab_size}, "
                f"seq_len={self.seq_len}, shared_classifier={self.shared_classifier})")


def read_header(path: str | Path) -> Llama2cHeader:
    """Read and sanity-check the header of a llama2.c checkpoint; :class:`CheckpointError` when it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise CheckpointError(f"cannot read llama2.c checkpoint {path}: {e}") from e
    if len(raw) < HEADER_BYTES:
        raise CheckpointError(f"{path} is not a llama2.c checkpoint: expected at least a {HEADER_BYTES}-byte "
                              f"header, the file has {len(raw)} bytes")
    vals = struct.unpack("<7i", raw)
    if vals[0] == _LLAMA2C_V1_MAGIC:
        raise CheckpointError(f"{path} is a llama2.c version 1/2 export (magic 'ak42'); only the legacy version 0 "
                              "format is supported: re-export it with `export.py --version 0`")
    header = Llama2cHeader(*vals)
    if not header.plausible():
        raise CheckpointError(f"{path} does not start with a valid llama2.c header: got dim, hidden_dim, n_layers, "
                              f"n_heads, n_kv_heads, vocab_size, seq_len = {vals}")
    return header


def is_llama2c_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a file with a plausible llama2.c header and exactly the size it implies."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        header = read_header(path)
    except CheckpointError:
        return False
    return path.stat().st_size == header.expected_bytes()


def find_llama2c_files(folder: str | Path) -> tuple[Path, Path | None] | None:
    """In a folder, find ``(checkpoint.bin, tokenizer.bin or None)`` of a llama2.c model; None when there is none.

    The checkpoint is a ``*.bin`` whose header is plausible (its size is checked later, by the loader, so
    that a truncated file is reported as such rather than ignored). The tokenizer is ``tok*.bin`` or
    ``tokenizer.bin``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    bins = sorted(p for p in folder.glob("*.bin") if p.is_file())
    toks = [p for p in bins if p.name.startswith("tok")]
    ckpts = []
    for p in bins:
        if p in toks or p.name.startswith(("pytorch_model", "training_args")):
            continue  # tokenizer files and HF / Trainer pickles
        try:
            read_header(p)
        except CheckpointError:
            continue
        ckpts.append(p)
    if not ckpts:
        return None
    return ckpts[0], (toks[0] if toks else None)


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Row order inside one head that turns llama2.c's interleaved RoPE into HF's rotate-half RoPE."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    perm = rope_permutation(head_dim)
    return w.reshape(n_heads, head_dim, -1)[:, perm, :].reshape(n_heads * head_dim, -1)


def _checkpoint_file(path: str | Path) -> tuple[Path, Path | None]:
    path = Path(path)
    if path.is_dir():
        found = find_llama2c_files(path)
        if found is None:
            raise CheckpointError(f"no llama2.c checkpoint (*.bin with a 7-int32 header) in {path}")
        return found
    if not path.exists():
        raise CheckpointError(f"no such llama2.c checkpoint: {path}")
    tok = find_llama2c_files(path.parent)
    return path, (tok[1] if tok else None)


def load_llama2c_state(path: str | Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Read a llama2.c checkpoint into ``(header, {name: float32 array})`` with names as in the module doc.

    The file size must equal what the header implies; otherwise :class:`CheckpointError` says expected vs
    actual bytes (a truncated download, or a file of another format).
    """
    ckpt, _ = _checkpoint_file(path)
    header = read_header(ckpt)
    actual, expected = ckpt.stat().st_size, header.expected_bytes()
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing data (another format or version?)"
        raise CheckpointError(f"llama2.c checkpoint {ckpt} is {what}: expected {expected:,} bytes (from its header: "
                              f"{header}), actual size {actual:,} bytes")
    data = np.fromfile(ckpt, dtype="<f4", offset=HEADER_BYTES)
    arrays, pos = {}, 0
    for name, shape in header.array_shapes():
        n = int(np.prod(shape))
        arrays[name] = data[pos:pos + n].reshape(shape)
        pos += n
    if not np.isfinite(data).all():
        raise CheckpointError(f"llama2.c checkpoint {ckpt} contains non-finite weights (corrupt file?)")
    return header, arrays


def llama2c_config(header: Llama2cHeader):
    """The ``transformers.LlamaConfig`` equivalent to a llama2.c header."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=header.vocab_size, hidden_size=header.dim, intermediate_size=header.hidden_dim,
                       num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
                       num_key_value_heads=header.n_kv_heads, head_dim=header.head_dim, hidden_act="silu",
                       max_position_embeddings=header.seq_len, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       tie_word_embeddings=header.shared_classifier, bos_token_id=1, eos_token_id=2,
                       attention_bias=False, mlp_bias=False)


def load_llama2c(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a llama2.c checkpoint (a ``.bin`` file, or a folder holding one) as an eval-mode ``LlamaForCausalLM``.

    The classifier is tied to the embedding when the header's vocab_size is positive. ``wq``/``wk`` rows are
    permuted per head so that HF's rotate-half RoPE computes exactly llama2.c's interleaved RoPE.
    """
    from transformers import LlamaForCausalLM

    header, w = load_llama2c_state(path)
    model = LlamaForCausalLM(llama2c_config(header))  # random init is cheap next to reading; weights replaced below
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    hd = header.head_dim
    sd = {"model.embed_tokens.weight": t(w["token_embedding"]), "model.norm.weight": t(w["rms_final"])}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t(w["rms_att"][i])
        sd[p + "post_attention_layernorm.weight"] = t(w["rms_ffn"][i])
        sd[p + "self_attn.q_proj.weight"] = _permute_heads(t(w["wq"][i]), header.n_heads, hd)
        sd[p + "self_attn.k_proj.weight"] = _permute_heads(t(w["wk"][i]), header.n_kv_heads, hd)
        sd[p + "self_attn.v_proj.weight"] = t(w["wv"][i])
        sd[p + "self_attn.o_proj.weight"] = t(w["wo"][i])
        sd[p + "mlp.gate_proj.weight"] = t(w["w1"][i])
        sd[p + "mlp.down_proj.weight"] = t(w["w2"][i])
        sd[p + "mlp.up_proj.weight"] = t(w["w3"][i])
    sd["lm_head.weight"] = t(w["token_embedding"] if header.shared_classifier else w["wcls"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:  # a bug in this mapping, not a user error
        raise CheckpointError(f"llama2.c -> Llama mapping incomplete: missing {missing}, unexpected {unexpected}")
    if header.shared_classifier and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        model.tie_weights()
    model = model.to(dtype)
    return model.eval()


class Llama2cTokenizer:
    """llama2.c's tokenizer (``tok*.bin``): SentencePiece-BPE pieces with scores, byte fallback, greedy merges.

    File layout: int32 ``max_token_length``, then per token: float32 score, int32 byte length, raw bytes.
    Ids 0, 1, 2 are ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS); 3..258 are the byte pieces ``<0x00>``..``<0xFF>``.

    ``encode`` follows llama2.c's ``run.c``: optional BOS, a dummy-prefix space, each UTF-8 character mapped
    to its piece (or to its bytes, id = byte + 3), then repeatedly merge the adjacent pair whose
    concatenation is a piece with the highest score (leftmost on ties). ``decode`` inverts it (dropping
    special tokens and the dummy-prefix space that follows BOS / starts the text).
    """

    unk_token_id, bos_token_id, eos_token_id = 0, 1, 2
    pad_token_id = None

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read llama2.c tokenizer {path}: {e}") from e
        pieces: list[bytes] = []
        scores: list[float] = []
        try:
            (self.max_token_length,) = struct.unpack_from("<i", raw, 0)
            pos = 4
            while pos < len(raw):
                score, n = struct.unpack_from("<fi", raw, pos)
                pos += 8
                if n < 0 or pos + n > len(raw):
                    raise struct.error("piece length out of range")
                pieces.append(raw[pos:pos + n])
                scores.append(score)
                pos += n
        except struct.error as e:
            raise CheckpointError(f"llama2.c tokenizer {path} is truncated or corrupt after {len(pieces)} pieces "
                                  f"({len(raw)} bytes): {e}") from e
        if len(pieces) < 259:
            raise CheckpointError(f"llama2.c tokenizer {path} has {len(pieces)} pieces; expected at least 259 "
                                  "(3 special tokens and 256 byte pieces)")
        self.path = path
        self.pieces, self.scores = pieces, scores
        self._ids: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            self._ids.setdefault(p, i)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False,
               add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` (HF spelling) overrides ``bos`` when given."""
        if add_special_tokens is not None:
            bos = add_special_tokens
        ids: list[int] = [self.bos_token_id] if bos else []
        tokens: list[int] = []
        if text:
            tokens.append(self._ids[b" "])  # dummy prefix, as SentencePiece's add_dummy_prefix
        for ch in text:
            b = ch.encode("utf-8")
            tid = self._ids.get(b)
            if tid is not None:
                tokens.append(tid)
            else:
                tokens.extend(byte + 3 for byte in b)
        ids.extend(self._merge(tokens))
        if eos:
            ids.append(self.eos_token_id)
        return ids

    def _merge(self, tokens: list[int]) -> list[int]:
        """llama2.c's merge loop (best-scoring adjacent pair first, leftmost on ties) in O(n log n).

        run.c rescans all pairs after each merge; a heap keyed by (-score, original position) over a linked
        list picks the same pair each time, since merging keeps the left-to-right order of positions.
        """
        n = len(tokens)
        if n < 2:
            return tokens
        tok, nxt, prv = list(tokens), list(range(1, n)) + [-1], list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j >= 0:
                tid = self._ids.get(self.pieces[tok[i]] + self.pieces[tok[j]])
                if tid is not None:
                    heapq.heappush(heap, (-self.scores[tid], i, tok[i], tok[j], tid))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b, tid = heapq.heappop(heap)
            j = nxt[i] if alive[i] else -1
            if j < 0 or tok[i] != a or tok[j] != b:
                continue  # stale: one side was merged since this pair was pushed
            tok[i], alive[j], nxt[i] = tid, False, nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        out, i = [], 0
        while i >= 0:
            out.append(tok[i])
            i = nxt[i]
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: byte pieces become raw bytes, specials are dropped, the dummy-prefix space removed."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = bytearray()
        prev = None
        for i, tid in enumerate(int(t) for t in ids):
            if tid < 0 or tid >= len(self.pieces):
                raise ValueError(f"token id {tid} out of range for a {len(self.pieces)}-piece vocabulary")
            if tid in (self.unk_token_id, self.bos_token_id, self.eos_token_id):
                if not skip_special_tokens:
                    out += self.pieces[tid]
                prev = tid
                continue
            piece = self.pieces[tid]
            if 3 <= tid < 259:
                piece = bytes([tid - 3])
            elif (prev is None or prev == self.bos_token_id) and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            prev = tid
        return out.decode("utf-8", errors="replace")

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, return_tensors: str | None = None):
        """Minimal HF-style call: ``{"input_ids": ...}`` for one text (or equal-length texts with ``"pt"``)."""
        if isinstance(text, str):
            ids = self.encode(text, bos=add_special_tokens)
            return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}
        batch = [self.encode(t, bos=add_special_tokens) for t in text]
        if return_tensors == "pt":
            if len({len(b) for b in batch}) > 1:
                raise ValueError("texts encode to different lengths; pass them one at a time (no padding token)")
            return {"input_ids": torch.tensor(batch)}
        return {"input_ids": batch}

    def __repr__(self) -> str:
        return f"Llama2cTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
