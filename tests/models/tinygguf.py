"""A tiny random Llama written as a GGUF file, the way llama.cpp's ``convert_hf_to_gguf.py`` writes one.

Only for tests: f32 tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...), the
query and key projections permuted into llama.cpp's rope layout (``LlamaModel.permute`` there;
transformers undoes it when it reads), ``output.weight`` only when the head is untied, and the
byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``) with its merges and chat template.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _permute(w, n_head: int):
    """llama.cpp's rope layout for q/k (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(directory: str | Path, *, tied: bool = False, tokenizer: bool = True, arch: str = "llama",
                    chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> tuple[Path, Path]:
    """``(hf_dir, gguf_path)``: the same random model as a Hugging Face directory and as a GGUF."""
    import json

    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.llm.tiny import corpus_text, make_tokenizer

    directory = Path(directory)
    hf_dir = directory / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(hf_dir, corpus_text(), chat_template=chat_template)
    torch.manual_seed(seed)
    hidden, layers, heads, kv_heads = 64, 2, 4, 2
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=2 * hidden, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so a mixed-up norm shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(hf_dir, safe_serialization=True)

    path = directory / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tok))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer:
        state = json.loads((hf_dir / "tokenizer.json").read_text())
        vocab = tok.get_vocab()
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        special = set(tok.all_special_tokens) | {"<|im_start|>", "<|im_end|>"}
        merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.bos_token_id)
        w.add_eos_token_id(tok.eos_token_id)
        w.add_pad_token_id(tok.pad_token_id)
        w.add_add_bos_token(False)
        if chat_template:
            w.add_chat_template(chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", np.ascontiguousarray(_permute(sd[p + "self_attn.q_proj.weight"], heads)))
        w.add_tensor(f"blk.{i}.attn_k.weight", np.ascontiguousarray(_permute(sd[p + "self_attn.k_proj.weight"], kv_heads)))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf_dir, path
