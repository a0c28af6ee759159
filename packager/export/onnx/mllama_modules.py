"""The torch modules Llama 3.2 Vision's three ONNX graphs are traced from (packager/export/onnx/mllama.py
says what each graph takes and returns): small wrappers around ``MllamaForConditionalGeneration`` that
reuse its modules' weights and pass every key/value explicitly."""

from __future__ import annotations

__all__ = ["wrap_mllama"]

_CLASSES: tuple = ()  # built on first use: this module imports without torch


def _torch_modules():
    """The three wrapper classes, defined on first use so that importing this module needs no torch."""
    global _CLASSES
    if _CLASSES:
        return _CLASSES
    import torch
    from torch import nn
    from transformers.models.mllama.modeling_mllama import apply_rotary_pos_emb, repeat_kv

    def attend(q, k, v, mask, scaling: float, groups: int):
        """transformers' ``eager_attention_forward`` (no dropout): [B, H, S, D] x [B, KV, T, D] -> [B, S, H * D]."""
        k = repeat_kv(k, groups)
        v = repeat_kv(v, groups)
        weights = torch.matmul(q, k.transpose(2, 3)) * scaling
        weights = weights + mask
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).contiguous()
        return out.reshape(out.shape[0], out.shape[1], -1)

    class _VisionGraph(nn.Module):
        """pixel_values, aspect_ratio_ids, aspect_ratio_mask -> cross_attention_states [B, V, hidden]."""

        def __init__(self, model):
            super().__init__()
            self.vision_model = model.model.vision_model
            self.multi_modal_projector = model.model.multi_modal_projector
            self.hidden_size = model.config.text_config.hidden_size

        def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
            states = self.vision_model(
                pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
            ).last_hidden_state
            # MllamaModel.forward: [B, N, T, P, Dv] -> projector -> [B * N * T, P, hidden]
            states = self.multi_modal_projector(states).reshape(-1, states.shape[-2], self.hidden_size)
            return states.reshape(pixel_values.shape[0], -1, self.hidden_size)

    class _CrossKVGraph(nn.Module):
        """cross_attention_states [B, V, hidden] -> (key, value) [B, kv_heads, V, head_dim] per cross-attention layer."""

        def __init__(self, model):
            super().__init__()
            lm = model.model.language_model
            self.layer_ids = list(lm.cross_attention_layers)
            self.attns = nn.ModuleList([lm.layers[i].cross_attn for i in self.layer_ids])

        def forward(self, cross_attention_states):
            bsz = cross_attention_states.shape[0]
            out = []
            for attn in self.attns:
                k = attn.k_proj(cross_attention_states).view(bsz, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
                v = attn.v_proj(cross_attention_states).view(bsz, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
                out += [attn.k_norm(k), v]
            return tuple(out)

    class _DecoderGraph(nn.Module):
        """The language model with explicit KV tensors (see the module docstring for the inputs and outputs).

        forward(input_ids, attention_mask, position_ids, cross_attention_mask, full_text_row_masked_out_mask,
        past, cross) with ``past`` = (key, value) of each self-attention layer in order, flattened, and
        ``cross`` likewise for the cross-attention layers; returns (logits, *present) flattened the same way.
        """

        def __init__(self, model):
            super().__init__()
            lm = model.model.language_model
            self.lm = lm
            self.lm_head = model.lm_head
            self.cross_ids = list(lm.cross_attention_layers)
            self.self_ids = [i for i in range(len(lm.layers)) if i not in self.cross_ids]
            self.min_value = float(torch.finfo(torch.float32).min)

        def forward(self, input_ids, attention_mask, position_ids, cross_attention_mask, full_text_row_masked_out_mask, past, cross):
            lm = self.lm
            hidden = lm.embed_tokens(input_ids)
            seq = input_ids.shape[1]
            past_len = past[0].shape[2]
            total = attention_mask.shape[1]
            # transformers' _prepare_4d_causal_attention_mask_with_cache_position: key j is hidden from
            # query i (at cache position past + i) when j > past + i or attention_mask[j] == 0.
            query_pos = torch.arange(seq, device=input_ids.device) + past_len
            key_pos = torch.arange(total, device=input_ids.device)
            allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & (attention_mask[:, None, None, :] != 0)
            causal = torch.where(allowed, torch.zeros((), dtype=hidden.dtype), torch.full((), self.min_value, dtype=hidden.dtype))
            cos, sin = lm.rotary_emb(hidden, position_ids)
            row_mask = full_text_row_masked_out_mask[:, 0]
            present = []
            slot = {layer: n for n, layer in enumerate(self.self_ids)}
            cslot = {layer: n for n, layer in enumerate(self.cross_ids)}
            for idx, layer in enumerate(lm.layers):
                residual = hidden
                h = layer.input_layernorm(hidden)
                if idx in cslot:
                    attn = layer.cross_attn
                    bsz = h.shape[0]
                    q = attn.q_proj(h).view(bsz, seq, attn.num_heads, attn.head_dim).transpose(1, 2)
                    q = attn.q_norm(q)
                    k, v = cross[2 * cslot[idx]], cross[2 * cslot[idx] + 1]
                    out = attn.o_proj(attend(q, k, v, cross_attention_mask, attn.scaling, attn.num_key_value_groups))
                    hidden = residual + layer.cross_attn_attn_gate.tanh() * out
                    residual = hidden
                    mlp = layer.mlp(layer.post_attention_layernorm(hidden)) * row_mask
                    hidden = residual + layer.cross_attn_mlp_gate.tanh() * mlp
                else:
                    attn = layer.self_attn
                    bsz = h.shape[0]
                    q = attn.q_proj(h).view(bsz, seq, attn.num_heads, attn.head_dim).transpose(1, 2)
                    k = attn.k_proj(h).view(bsz, seq, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
                    v = attn.v_proj(h).view(bsz, seq, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
                    q, k = apply_rotary_pos_emb(q, k, cos, sin)
                    n = slot[idx]
                    k = torch.cat([past[2 * n], k], dim=2)
                    v = torch.cat([past[2 * n + 1], v], dim=2)
                    present += [k, v]
                    out = attn.o_proj(attend(q, k, v, causal, attn.scaling, attn.num_key_value_groups))
                    hidden = residual + out
                    residual = hidden
                    hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = lm.norm(hidden)
            return (self.lm_head(hidden), *present)

    _CLASSES = (_VisionGraph, _CrossKVGraph, _DecoderGraph)
    return _CLASSES


def wrap_mllama(model) -> dict:
    """The three export wrappers of a loaded ``MllamaForConditionalGeneration`` (eval mode, fp32), sharing its weights.

    Returns ``{"vision": ..., "cross_kv": ..., "decoder": ...}`` (torch modules; their inputs and outputs are
    the graphs', see packager/export/onnx/mllama.py).
    """
    vision, cross_kv, decoder = _torch_modules()
    return {"vision": vision(model).eval(), "cross_kv": cross_kv(model).eval(), "decoder": decoder(model).eval()}
