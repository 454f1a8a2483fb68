"""Tiny random-init models built from transformers configs, for tests and examples.

``tiny_model("llama")`` returns a 2-layer float32 model in eval mode, deterministic under a seed.
"""
from __future__ import annotations

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt", "bert")


def tiny_config(arch: str, num_layers: int = 2, **overrides):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                  num_attention_heads=4, max_position_embeddings=256)
    if arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"):
        common.update(num_key_value_heads=2, head_dim=16)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=False)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, tie_word_embeddings=False)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**common)  # ties embeddings by default
    elif arch == "phi3":
        common.pop("head_dim")
        cfg = tf.Phi3Config(**common, tie_word_embeddings=False, pad_token_id=0)
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=num_layers,
                           num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                           do_layer_norm_before=True, pad_token_id=1)
    elif arch == "bert":
        cfg = tf.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                            num_attention_heads=4, max_position_embeddings=256)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str, num_layers: int = 2, seed: int = 0, dtype=torch.float32, **overrides):
    import transformers as tf

    cfg = tiny_config(arch, num_layers, **overrides)
    torch.manual_seed(seed)
    if arch == "bert":
        model = tf.BertModel(cfg, add_pooling_layer=False)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    model = model.to(dtype).eval()
    # random-init norms are all ones; perturb them so norm folding is really tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name.lower() or "layer_norm" in name.lower() or "LayerNorm" in name):
                p.add_(0.1 * torch.randn_like(p))
    return model
