"""Attention slicing for FLUX transformers.

diffusers' ``enable_attention_slicing`` only reaches modules with ``set_attention_slice`` (UNets); FLUX's
attention has none, so the toggle would do nothing there. This processor computes the same attention with the
queries split into chunks, so the attention matrix of a chunk (not of the whole sequence) is what has to fit.
That matters where PyTorch falls back to the math kernel (CPU, old GPUs, fp32); with flash/memory-efficient
SDPA it only costs time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 1024


class SlicedFluxAttnProcessor:
    """Same maths as diffusers' FluxAttnProcessor; queries processed ``chunk`` tokens at a time."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, chunk: int = DEFAULT_CHUNK):
        self.chunk = int(chunk)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        text_len = 0
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text_len = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # B, heads, S, D
        out = torch.cat([
            F.scaled_dot_product_attention(q[:, :, s : s + self.chunk], k, v, attn_mask=attention_mask)
            for s in range(0, q.shape[2], self.chunk)
        ], dim=2)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            text, image = out[:, :text_len], out[:, text_len:]
            image = attn.to_out[1](attn.to_out[0](image.contiguous()))
            return image, attn.to_add_out(text.contiguous())
        return out


def enable_sliced_attention(transformer: torch.nn.Module, chunk: int = DEFAULT_CHUNK) -> int:
    """Give every FLUX attention module the sliced processor; returns how many were changed."""
    n = 0
    for module in transformer.modules():
        if hasattr(module, "set_processor") and hasattr(module, "norm_q") and hasattr(module, "head_dim"):
            module.set_processor(SlicedFluxAttnProcessor(chunk))
            n += 1
    return n
