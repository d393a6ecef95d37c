"""GGUF weight source: our own dequantization, HF names and HF layout, metadata -> HF config.

Why our own dequantizer: it is the seam where a future fused quantized-matmul path plugs in, and it
is vectorised over whole tensors (chunked, so a big tensor never makes more than a few chunk-sized
temporaries). It must agree bit for bit with `gguf.quants.dequantize`: every formula below keeps the
float32 operation order of ggml's reference (`(d * sc) * q - (dmin * m)` etc.).

Block layouts (ggml, QK_K = 256) are written as NumPy structured dtypes, so a raw byte buffer is
viewed as an array of blocks with named fields and no copying.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import threading
from typing import Any, Iterator, Optional

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

from aphrodite_jax.loaders.gguf_snapshot import HeaderSnapshot
from aphrodite_jax.models.registry import architectures, by_gguf_arch, gguf_architectures

logger = logging.getLogger(__name__)

__all__ = ["dequantize", "GGUFModel", "iter_gguf_weights", "gguf_hf_name", "SUPPORTED_QTYPES",
           "SUPPORTED_ARCHITECTURES"]

QK_K = 256
_F16 = "<f2"

# One block of each type; sizes match gguf.GGML_QUANT_SIZES (checked in the tests).
_BLOCK_DTYPES: dict[QT, np.dtype] = {
    QT.Q4_0: np.dtype([("d", _F16), ("qs", "u1", 16)]),
    QT.Q4_1: np.dtype([("d", _F16), ("m", _F16), ("qs", "u1", 16)]),
    QT.Q5_0: np.dtype([("d", _F16), ("qh", "<u4"), ("qs", "u1", 16)]),
    QT.Q5_1: np.dtype([("d", _F16), ("m", _F16), ("qh", "<u4"), ("qs", "u1", 16)]),
    QT.Q8_0: np.dtype([("d", _F16), ("qs", "i1", 32)]),
    QT.Q2_K: np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", _F16), ("dmin", _F16)]),
    QT.Q3_K: np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", _F16)]),
    QT.Q4_K: np.dtype([("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qs", "u1", 128)]),
    QT.Q5_K: np.dtype([("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qh", "u1", 32),
                       ("qs", "u1", 128)]),
    QT.Q6_K: np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", _F16)]),
}
_BLOCK_ELEMS: dict[QT, int] = {QT.Q4_0: 32, QT.Q4_1: 32, QT.Q5_0: 32, QT.Q5_1: 32, QT.Q8_0: 32,
                               QT.Q2_K: QK_K, QT.Q3_K: QK_K, QT.Q4_K: QK_K, QT.Q5_K: QK_K, QT.Q6_K: QK_K}
_FLOAT_TYPES = {QT.F32: 4, QT.F16: 2, QT.BF16: 2}
SUPPORTED_QTYPES = tuple(_FLOAT_TYPES) + tuple(_BLOCK_DTYPES)

_U8 = np.uint8


def _f32(x: np.ndarray) -> np.ndarray:
    """fp16 scale field -> float32 column [NB, 1]."""
    return x.astype(np.float32)[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[NB, n] packed bytes -> [NB, 2n]: all low nibbles first, then all high nibbles."""
    return np.concatenate([qs & _U8(0x0F), qs >> _U8(4)], axis=-1)


def _bits(packed: np.ndarray, nbits: int) -> np.ndarray:
    """[NB, n] -> [NB, nbits, n]: bit b of every byte/word, for b in range(nbits)."""
    shifts = np.arange(nbits, dtype=packed.dtype)[None, :, None]
    return (packed[:, None, :] >> shifts) & packed.dtype.type(1)


def _crumbs(packed: np.ndarray) -> np.ndarray:
    """[NB, ..., n] bytes -> [NB, ..., 4, n]: the four 2-bit fields (bits 0-1, 2-3, 4-5, 6-7)."""
    shifts = np.array([0, 2, 4, 6], dtype=_U8).reshape((4, 1))
    return (packed[..., None, :] >> shifts) & _U8(3)


def _kquant_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, [NB, 8] each."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & _U8(63), (c & _U8(0x0F)) | ((a >> _U8(6)) << _U8(4))], axis=-1)
    mn = np.concatenate([b & _U8(63), (c >> _U8(4)) | ((b >> _U8(6)) << _U8(4))], axis=-1)
    return sc, mn


def _q3k_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K: 12 bytes -> sixteen signed 6-bit scales [NB, 16] as float32 (offset 32 removed)."""
    low = _nibbles(s[:, :8])                                   # [NB, 16]
    high = _crumbs(s[:, 8:12]).reshape(s.shape[0], 16)         # [NB, 16]: index = 4*(i//4) + i%4
    sc = low | (high << _U8(4))
    return sc.astype(np.float32) - np.float32(32)


def _deq_blocks(b: np.ndarray, qt: QT) -> np.ndarray:
    """Structured blocks [NB] -> float32 [NB, block_elems]."""
    nb = b.shape[0]
    if qt == QT.Q8_0:
        return b["qs"].astype(np.float32) * _f32(b["d"])
    if qt in (QT.Q4_0, QT.Q4_1):
        q = _nibbles(b["qs"])                                  # [NB, 32]
        if qt == QT.Q4_0:
            return _f32(b["d"]) * (q.astype(np.float32) - np.float32(8))
        return _f32(b["d"]) * q.astype(np.float32) + _f32(b["m"])
    if qt in (QT.Q5_0, QT.Q5_1):
        hi = _bits(b["qh"][:, None], 32).reshape(nb, 32).astype(_U8)
        q = (_nibbles(b["qs"]) | (hi << _U8(4))).astype(np.float32)  # [NB, 32]
        if qt == QT.Q5_0:
            return _f32(b["d"]) * (q - np.float32(16))
        return _f32(b["d"]) * q + _f32(b["m"])
    if qt == QT.Q2_K:
        q = _crumbs(b["qs"].reshape(nb, 2, 32)).reshape(nb, 16, 16).astype(np.float32)
        sc = b["scales"]                                       # [NB, 16]: low nibble scale, high min
        dl = (_f32(b["d"]) * (sc & _U8(0x0F)).astype(np.float32))[..., None]
        ml = (_f32(b["dmin"]) * (sc >> _U8(4)).astype(np.float32))[..., None]
        return (dl * q - ml).reshape(nb, QK_K)
    if qt == QT.Q3_K:
        low = _crumbs(b["qs"].reshape(nb, 2, 32)).reshape(nb, QK_K).astype(np.int8)
        hbit = _bits(b["hmask"], 8).reshape(nb, QK_K).astype(np.int8)   # bit set -> no offset
        q = (low - np.int8(4) * (np.int8(1) - hbit)).astype(np.float32).reshape(nb, 16, 16)
        dl = (_f32(b["d"]) * _q3k_scales(b["scales"]))[..., None]
        return (dl * q).reshape(nb, QK_K)
    if qt in (QT.Q4_K, QT.Q5_K):
        q = b["qs"].reshape(nb, 4, 32)
        q = np.stack([q & _U8(0x0F), q >> _U8(4)], axis=2).reshape(nb, 8, 32)
        if qt == QT.Q5_K:
            q = q | (_bits(b["qh"], 8) << _U8(4))              # [NB, 8, 32]
        sc, mn = _kquant_scale_min(b["scales"])
        d = (_f32(b["d"]) * sc.astype(np.float32))[..., None]
        dm = (_f32(b["dmin"]) * mn.astype(np.float32))[..., None]
        return (d * q.astype(np.float32) - dm).reshape(nb, QK_K)
    if qt == QT.Q6_K:
        low = _nibbles(b["ql"].reshape(nb, 2, 64))             # [NB, 2, 128]
        high = _crumbs(b["qh"].reshape(nb, 2, 32)).reshape(nb, 2, 128)
        q = ((low | (high << _U8(4))).astype(np.float32) - np.float32(32)).reshape(nb, 16, 16)
        d = (_f32(b["d"]) * b["scales"].astype(np.float32))[..., None]
        return (d * q).reshape(nb, QK_K)
    raise NotImplementedError(f"dequantization of {qt.name} is not implemented")


def dequantize(raw: np.ndarray, qtype: QT | int, shape: Optional[tuple[int, ...]] = None,
               *, chunk_blocks: int = 1 << 16) -> np.ndarray:
    """Raw GGUF tensor data (as `GGUFReader` gives it) -> float32 array.

    `shape` is the numpy (row-major, HF-order) shape; by default it is inferred from `raw`, whose
    last axis holds the bytes of one row for quantized types.
    """
    qt = QT(qtype)
    raw = np.ascontiguousarray(raw)
    if qt in _FLOAT_TYPES:
        if shape is None:
            shape = raw.shape if raw.dtype != np.uint8 else (
                *raw.shape[:-1], raw.shape[-1] // _FLOAT_TYPES[qt])
        buf = raw.reshape(-1).view(np.uint8)
        if qt == QT.F32:
            out = buf.view("<f4").astype(np.float32, copy=True)
        elif qt == QT.F16:
            out = buf.view(_F16).astype(np.float32)
        else:
            out = (buf.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
        return out.reshape(shape)
    if qt not in _BLOCK_DTYPES:
        raise NotImplementedError(f"dequantization of {qt.name} is not implemented "
                                  f"(supported: {[t.name for t in SUPPORTED_QTYPES]})")
    bdt, per = _BLOCK_DTYPES[qt], _BLOCK_ELEMS[qt]
    if shape is None:
        if raw.shape[-1] % bdt.itemsize:
            raise ValueError(f"{qt.name} row of {raw.shape[-1]} bytes is not whole blocks")
        shape = (*raw.shape[:-1], raw.shape[-1] // bdt.itemsize * per)
    blocks = raw.reshape(-1).view(np.uint8).view(bdt)          # [NB] structured
    n = int(np.prod(shape))
    if blocks.shape[0] * per != n:
        raise ValueError(f"{qt.name} data holds {blocks.shape[0] * per} values, shape {shape} needs {n}")
    out = np.empty((blocks.shape[0], per), np.float32)        # [NB, block_elems]
    for s in range(0, blocks.shape[0], chunk_blocks):
        out[s:s + chunk_blocks] = _deq_blocks(blocks[s:s + chunk_blocks], qt)
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------
# GGUF file -> HF names, HF layout, HF config / tokenizer / chat template
# ----------------------------------------------------------------------------------------------

# Architectures whose tensors map one to one onto HF's `LlamaForCausalLM`-shaped checkpoints (models/registry.py).
SUPPORTED_ARCHITECTURES = gguf_architectures()

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp stores that HF recomputes from the config (llama-3 rope scaling factors).
_SKIPPED = {"rope_freqs"}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")


def gguf_hf_name(gguf_name: str) -> Optional[str]:
    """GGUF tensor name -> HF parameter name; None for tensors HF does not keep (rope_freqs).

    Raises KeyError for a tensor we do not know, so an unsupported model fails loudly.
    """
    m = _BLK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    m = _TOP_RE.match(gguf_name)
    if m:
        part, kind = m.groups()
        if part in _SKIPPED:
            return None
        if part in _TOP_NAMES:
            return f"{_TOP_NAMES[part]}.{kind}"
    raise KeyError(f"GGUF tensor {gguf_name!r} has no HF name in our mapping")


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for llama-family models.

    llama.cpp's converter reorders each head's rows from HF's "rotate half" layout
    (x0..x_{d/2-1}, x_{d/2}..x_{d-1}) into interleaved pairs (x0, x_{d/2}, x1, ...). Here each head's
    rows are read as [d/2, 2] pairs and transposed back to [2, d/2]. Works for weights and biases.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    out = w.reshape(n_head, half, 2, *w.shape[1:])            # [H, d/2, 2, ...]
    return np.ascontiguousarray(out.swapaxes(1, 2)).reshape(w.shape)  # [H, 2, d/2, ...] -> [H*d, ...]


def _field_value(field: Any) -> Any:
    return field.contents()


_PARSED: dict[tuple, Any] = {}


def _parsed_once(path: str, what: Any, build: Any) -> Any:
    """transformers re-reads the whole GGUF for a config or tokenizer (seconds each); keep one parse per
    file version per process and hand out copies, so a second engine on the same file starts fast."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, what)
    if key not in _PARSED:
        _PARSED[key] = build()
    return copy.deepcopy(_PARSED[key])


_OPENED: dict[tuple, Any] = {}
_OPEN_LOCK = threading.Lock()


def _file_once(path: str, kind: str, build: Any) -> Any:
    """One GGUFReader / memmap per file version per process (the loader and the tokenizer share it)."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, kind)
    with _OPEN_LOCK:
        if key not in _OPENED:
            _OPENED[key] = build()
        return _OPENED[key]


def _reader_once(path: str) -> "gguf.GGUFReader":
    return _file_once(path, "reader", lambda: gguf.GGUFReader(path, "r"))


def _memmap_once(path: str) -> np.ndarray:
    return _file_once(path, "memmap", lambda: np.memmap(path, dtype=np.uint8, mode="r"))


class GGUFModel:
    """One GGUF file: its metadata as an HF config, tokenizer and chat template, and its weights.

    The file is memory-mapped, so opening it costs no weight memory; weights are dequantized one tensor at a
    time in `iter_weights`. Parsing the header (`GGUFReader`) and having transformers build the config and
    tokenizer from it take seconds each; with `cache_dir`, what they produce is kept there (see
    `HeaderSnapshot`) and a later start on the same file version reads it back instead.
    """

    def __init__(self, path: str | os.PathLike, cache_dir: Optional[str] = None):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self.folder, self.filename = os.path.split(self.path)
        self._reader = None
        self._hf_config = None
        self.snapshot = HeaderSnapshot.open(self.path, cache_dir) if cache_dir else None

    @property
    def reader(self) -> "gguf.GGUFReader":
        if self._reader is None:
            self._reader = _reader_once(self.path)
        return self._reader

    # ---- metadata -------------------------------------------------------------------------
    def metadata(self, key: str, default: Any = None) -> Any:
        """One metadata value (str, int, float, or list), or `default` when absent."""
        if self.snapshot is not None and self.snapshot.has_field(key):
            return self.snapshot.field(key, default)
        field = self.reader.fields.get(key)
        return default if field is None else _field_value(field)

    @property
    def architecture(self) -> str:
        """llama.cpp's architecture name, with HF's rename of llama-typed Mistral files (a registry entry's
        `gguf_name_alias`)."""
        arch = self.metadata("general.architecture")
        name = str(self.metadata("general.name", "") or "").lower()
        for entry in architectures():
            alias = entry.gguf_name_alias
            if alias and arch == alias[0] and alias[1] in name:
                return entry.gguf_arch
        return arch

    @property
    def chat_template(self) -> Optional[str]:
        return self.metadata("tokenizer.chat_template")

    @property
    def bos_token_id(self) -> Optional[int]:
        v = self.metadata("tokenizer.ggml.bos_token_id")
        return None if v is None else int(v)

    @property
    def eos_token_id(self) -> Optional[int]:
        v = self.metadata("tokenizer.ggml.eos_token_id")
        return None if v is None else int(v)

    @property
    def add_bos_token(self) -> Optional[bool]:
        v = self.metadata("tokenizer.ggml.add_bos_token")
        return None if v is None else bool(v)

    def hf_config(self):
        """The HF `PretrainedConfig`, built by transformers from the GGUF metadata."""
        if self._hf_config is None:
            from transformers import AutoConfig

            def build():
                cfg = self.snapshot.hf_config() if self.snapshot is not None else None
                if cfg is None:
                    cfg = AutoConfig.from_pretrained(self.folder, gguf_file=self.filename)
                    if self.snapshot is not None:
                        self.snapshot.save_hf_config(cfg)
                return cfg

            cfg = _parsed_once(self.path, "config", build)
            # transformers maps no head_dim for qwen2/qwen3 GGUFs (Qwen3Config then defaults to
            # 128): take it from attention.key_length, else from the Q projection's rows.
            hd = self._head_dim()
            if hd is not None and getattr(cfg, "head_dim", None) not in (None, hd):
                cfg.head_dim = hd
            self._hf_config = cfg
        return self._hf_config

    def _head_dim(self) -> Optional[int]:
        arch = self.metadata("general.architecture")
        kl = self.metadata(f"{arch}.attention.key_length")
        if kl is not None:
            return int(kl)
        n_head = self.metadata(f"{arch}.attention.head_count")
        for t in self._tensor_index():
            if t["name"] == "blk.0.attn_q.weight" and n_head:
                return int(t["ne"][-1]) // int(n_head)     # ggml ne1 = rows = n_head * head_dim
        return None

    def tokenizer(self, **kwargs):
        """The HF fast tokenizer, built by transformers from the GGUF vocabulary and merges."""
        from transformers import AutoTokenizer

        def build():
            snap = self.snapshot if not kwargs else None  # only the plain tokenizer is kept
            tok = snap.tokenizer() if snap is not None else None
            if tok is None:
                tok = AutoTokenizer.from_pretrained(self.folder, gguf_file=self.filename, **kwargs)
                if snap is not None:
                    snap.save_tokenizer(tok)
            return tok

        tok = _parsed_once(self.path, ("tokenizer", tuple(sorted(kwargs.items()))), build)
        if getattr(tok, "chat_template", None) is None and self.chat_template:
            tok.chat_template = self.chat_template
        return tok

    def generation_defaults(self) -> dict[str, Any]:
        """What generation_config.json would give: bos/eos/pad ids from the tokenizer metadata."""
        out = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}
        pad = self.metadata("tokenizer.ggml.padding_token_id")
        out["pad_token_id"] = None if pad is None else int(pad)
        return out

    # ---- weights --------------------------------------------------------------------------
    def _tensor_index(self) -> list[dict[str, Any]]:
        """name, ggml type, ne (ggml order), byte offset and size of every tensor."""
        if self.snapshot is not None and self.snapshot.tensors is not None:
            return self.snapshot.tensors
        index = [{"name": t.name, "type": int(t.tensor_type), "ne": [int(x) for x in t.shape.tolist()],
                  "offset": int(t.data_offset), "nbytes": int(t.n_bytes)} for t in self.reader.tensors]
        if self.snapshot is not None:
            self.snapshot.save_header(self.reader, index)
        return index

    def _tensor_data(self, info: dict[str, Any]) -> np.ndarray:
        """The raw bytes of one tensor (uint8, memory-mapped; `dequantize` takes the shape)."""
        if self._reader is not None:
            return self._reader.data[info["offset"]:info["offset"] + info["nbytes"]]
        mm = _memmap_once(self.path)
        return mm[info["offset"]:info["offset"] + info["nbytes"]]

    def tensor_names(self) -> list[str]:
        return [t["name"] for t in self._tensor_index()]

    def _head_counts(self) -> tuple[int, int]:
        arch = self.metadata("general.architecture")
        n_head = int(self.metadata(f"{arch}.attention.head_count"))
        n_kv = int(self.metadata(f"{arch}.attention.head_count_kv", n_head))
        return n_head, n_kv

    def iter_weights(self, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (hf_name, array) one tensor at a time, in HF layout ([out, in] for linears)."""
        arch = self.metadata("general.architecture")
        entry = by_gguf_arch(arch)
        if entry is None:
            raise NotImplementedError(f"GGUF architecture {arch!r} is not supported "
                                      f"(supported: {', '.join(gguf_architectures())})")
        permuted = entry.gguf_permute_qk    # only llama.cpp's llama converter permutes Q/K rows
        n_head, n_kv = self._head_counts()
        for t in self._tensor_index():
            hf_name = gguf_hf_name(t["name"])
            if hf_name is None:
                continue
            shape = tuple(reversed(t["ne"]))                        # ggml ne -> numpy order
            w = dequantize(self._tensor_data(t), t["type"], shape)
            if permuted and ".self_attn.q_proj." in hf_name:
                w = _unpermute_rope_rows(w, n_head)
            elif permuted and ".self_attn.k_proj." in hf_name:
                w = _unpermute_rope_rows(w, n_kv)
            if np.dtype(dtype) != np.float32:
                w = w.astype(dtype)
            yield hf_name, w


def iter_gguf_weights(path: str | os.PathLike, dtype: Any = np.float32
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, array) for every tensor of a GGUF file, one at a time (see GGUFModel)."""
    yield from GGUFModel(path).iter_weights(dtype)
