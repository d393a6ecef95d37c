"""Build a model from a ModelConfig: resolve the source, build abstractly, load tensor by tensor sharded.

The module is first built with `nnx.eval_shape` (no memory), then every weight is placed straight into its
sharded device array as it arrives from the weight source (safetensors, GGUF) or is drawn on device
(dummy). The engine's ModelRunner then splits the module into the pure jitted step.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from aphrodite_jax.distributed.sharding import named_sharding
from aphrodite_jax.layers.norm import RMSNorm
from aphrodite_jax.models.registry import by_model_type, default_model_type, get_model_class
from pallas_kernels import AttentionNeeds, resolve_attention_backend

logger = logging.getLogger(__name__)

_DTYPE_ALIASES = {"float32": jnp.float32, "float": jnp.float32, "fp32": jnp.float32,
                  "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                  "float16": jnp.float16, "half": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(name: str) -> jnp.dtype:
    """'auto' is fp32 on CPU and bf16 on TPU/GPU."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {name!r}")
    return jnp.dtype(_DTYPE_ALIASES[name])


@dataclass
class LoadedModel:
    model: Any  # the nnx module, weights on device
    hf_config: Any
    dtype: jnp.dtype
    max_model_len: int
    tokenizer_source: Optional[str]  # HF folder / GGUF folder to load the tokenizer from
    gguf_file: Optional[str] = None  # set when the tokenizer comes from a GGUF file in tokenizer_source
    source_kind: str = "hf_dir"  # "hf_dir" | "gguf" | "dummy"
    source_path: Optional[str] = None  # the weight file / folder (None for dummy weights)
    attention_backend: str = "auto"  # the resolved backend the attention layers call (pallas_kernels)
    extra: dict = field(default_factory=dict)


def build_abstract(model_cls, hf_config, dtype, mesh: Optional[Mesh], attention_backend: str = "auto"):
    """The module with ShapeDtypeStruct leaves: structure and logical axes, no memory."""
    return nnx.eval_shape(lambda: model_cls(hf_config, dtype=dtype, rngs=nnx.Rngs(0), mesh=mesh,
                                            attention_backend=attention_backend))


def choose_attention(requested: str, model_cls, hf_config, dtype, page_size: int) -> str:
    """The attention backend for this model, resolved once per load and logged. Resolving runs the backend's
    probe (the C++ kernel is built and registered), which must happen before any step is loaded from the
    executable cache: a loaded step calls the kernel by name."""
    needs = AttentionNeeds(**model_cls.attention_needs(hf_config), cache_dtype=jnp.dtype(dtype).name,
                           page_size=page_size)
    backend = resolve_attention_backend(requested, jax.default_backend(), needs)
    logger.info("attention: %s (%s)", backend.name, backend.description)
    return backend.name


def _progress(it: Iterable, total: Optional[int], desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, total=total, desc=desc, unit="tensor", leave=False)


def init_dummy_weights(model, seed: int = 0, std: float = 0.02) -> None:
    """Random weights drawn directly on device in their final sharding (norms the identity scale: weight 1,
    or 0 for a (1 + w) norm; biases 0). One compiled initialiser per distinct (kind, shape, dtype, sharding),
    so big configs compile a handful."""
    key = jax.random.PRNGKey(seed)
    params = [(p, v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
    offset = {id(m.weight) for _, m in nnx.iter_graph(model) if isinstance(m, RMSNorm) and m.offset}
    inits: dict[tuple, Callable] = {}
    for i, (path, param) in enumerate(_progress(params, len(params), "dummy weights")):
        cur = param.get_value()
        shape, dtype = tuple(cur.shape), jnp.dtype(cur.dtype)
        sharding = named_sharding(model.mesh, param.get_metadata()["logical_axes"]) if model.mesh is not None \
            else None
        kind = "zeros" if str(path[-1]) == "bias" or id(param) in offset else \
            "ones" if "norm" in ".".join(map(str, path)) else "normal"
        sig = (kind, shape, dtype, sharding)
        if sig not in inits:
            def fn(k, kind=kind, shape=shape, dtype=dtype):
                if kind == "zeros":
                    return jnp.zeros(shape, dtype)
                if kind == "ones":
                    return jnp.ones(shape, dtype)
                return (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
            inits[sig] = jax.jit(fn, out_shardings=sharding)
        param.set_value(inits[sig](jax.random.fold_in(key, i)))


def _dummy_hf_config(model_config):
    from transformers import AutoConfig
    over = dict(model_config.hf_overrides or {})
    src = model_config.model
    if src and (os.path.isdir(src) or src.endswith(".json")):
        cfg = AutoConfig.from_pretrained(src)
    elif src and not over.get("model_type"):
        cfg = AutoConfig.from_pretrained(src)  # HF id already in the local cache
    else:
        cfg = AutoConfig.for_model(over.pop("model_type", default_model_type()))
    for k, v in over.items():
        setattr(cfg, k, v)
    if not getattr(cfg, "architectures", None):
        arch = by_model_type(cfg.model_type)
        cfg.architectures = [arch.hf_name] if arch else None
    return cfg


def _resolve_source(model_config) -> tuple[str, str]:
    """(kind, path): a local HF folder is taken as is; anything else goes through loaders.resolve."""
    name = model_config.model
    if name and os.path.isdir(name) and os.path.exists(os.path.join(name, "config.json")):
        return "hf_dir", name
    if name and os.path.isfile(name) and name.endswith(".gguf"):
        return "gguf", name
    from aphrodite_jax.loaders.resolve import resolve_model
    resolved = resolve_model(name)
    return resolved.kind, str(resolved.path)


def load_model(model_config, mesh: Optional[Mesh] = None, cache_dir: Optional[str] = None, *,
               attention_backend: str = "auto", page_size: int = 16) -> LoadedModel:
    """Load per model_config.load_format ('auto' | 'safetensors' | 'gguf' | 'dummy') onto `mesh`.

    cache_dir: where a GGUF file's parsed header, HF config and tokenizer are kept between starts.
    attention_backend, page_size: the engine's attention backend ("auto" or a name) and KV page size."""
    dtype = resolve_dtype(model_config.dtype)
    fmt = model_config.load_format
    gguf_file = path = None
    if fmt == "dummy":
        hf_config, kind = _dummy_hf_config(model_config), "dummy"
        tok_src = model_config.tokenizer or (model_config.model if model_config.model and
                                             os.path.isdir(model_config.model) else None)
        weights, total = None, None
    else:
        kind, path = _resolve_source(model_config)
        if fmt == "safetensors" and kind != "hf_dir":
            raise ValueError(f"load_format='safetensors' needs an HF folder, got a {kind} source: {path}")
        if fmt == "gguf" and kind != "gguf":
            raise ValueError(f"load_format='gguf' needs a .gguf file, got a {kind} source: {path}")
        if kind == "gguf":
            from aphrodite_jax.loaders.gguf_loader import GGUFModel
            g = GGUFModel(path, cache_dir=cache_dir)
            hf_config = g.hf_config()
            weights, total = g.iter_weights(), len(g.tensor_names())
            tok_src, gguf_file = model_config.tokenizer or g.folder, (None if model_config.tokenizer else g.filename)
        else:
            from transformers import AutoConfig
            from aphrodite_jax.loaders.safetensors_loader import count_safetensors_weights, iter_safetensors_weights
            hf_config = AutoConfig.from_pretrained(path)
            weights, total = iter_safetensors_weights(path), count_safetensors_weights(path)
            tok_src = model_config.tokenizer or path
    model_cls = get_model_class(hf_config)
    attention = choose_attention(attention_backend, model_cls, hf_config, dtype, page_size)
    model = build_abstract(model_cls, hf_config, dtype, mesh, attention)
    if weights is None:
        init_dummy_weights(model, seed=model_config.seed)
    else:
        model.load_weights(_progress(weights, total, "loading weights"))
    if model_config.quantization:  # the quantization hook: int8 copies of the loaded matmul weights
        from aphrodite_jax.layers.quantization import quantize_model
        quantize_model(model, model_config.quantization)
    max_len = model_config.max_model_len or int(getattr(hf_config, "max_position_embeddings", 2048))
    return LoadedModel(model=model, hf_config=hf_config, dtype=dtype, max_model_len=max_len,
                       tokenizer_source=tok_src, gguf_file=gguf_file, source_kind=kind, source_path=path,
                       attention_backend=attention)
