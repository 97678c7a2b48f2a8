"""Quantized attention: 4-bit operands of Q·Kᵀ and of softmax(·)·V.

Hugging Face transformers 5.x models call a registered attention function (`AttentionInterface`); we register
"compressed" and switch the model to it, so no model code is patched. The quantizers live on each attention module
(`module.attn_quant`), where the function finds them. timm: its `Attention` (ViT, DeiT), Swin's `WindowAttention`,
BEiT's, EVA's and ViT-RoPE's attention are swapped for subclasses that run timm's explicit (non-fused) path with the
quantizers in it; parameter names are unchanged.
"""
from __future__ import annotations

import functools
import inspect
import re
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .fast_dropout import fast_dropout
from .linear import as_linear
from .pact import ActQuantizer

ATTN_IMPL = "compressed"


class AttentionQuantizers(nn.Module):
    """One quantizer per matmul operand: q, k (Q·Kᵀ) and p (softmax output), v (P·V)."""

    def __init__(self, bits: int, prob_bits: int, method: str, zero_preserving: bool, prob_method: str | None = None):
        super().__init__()
        self.q = ActQuantizer(bits, method, zero_preserving)
        self.k = ActQuantizer(bits, method, zero_preserving)
        self.v = ActQuantizer(bits, method, zero_preserving)
        # probabilities are in [0, 1]: one-sided, and exact zeros (masked keys) stay zero on any grid; 32 bits: off
        self.p = ActQuantizer(prob_bits, prob_method or method, zero_preserving, signed=False,
                              init_range=(0.0, 1.0)) if prob_bits < 32 else None


def attention_core(q, k, v, additive_mask, scaling, dropout_p, training, quants: AttentionQuantizers | None,
                   softcap: float | None = None):
    """Explicit attention (B, H, L, D) -> (B, H, L, D), probabilities; quantized operands when `quants` is given.
    `softcap` caps the scores as softcap·tanh(scores/softcap) before the mask (Gemma-2 style).
    With nothing to quantize, no softcap and no dropout it is SDPA's fused kernel (faster, also on CPU), and no
    probabilities."""
    if quants is None and softcap is None and not (training and dropout_p > 0):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, scale=scaling), None
    if quants is not None:
        q, k, v = quants.q(q), quants.k(k), quants.v(v)
    # the scale goes on the (quantized) queries, L x D, rather than on the L x L scores: the same up to rounding,
    # and a pass over the largest tensor fewer (as SDPA's math path does)
    scores = torch.matmul(q * scaling, k.transpose(-2, -1))
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = scores.softmax(dim=-1)
    if quants is not None and quants.p is not None:
        probs = quants.p(probs)
    probs = fast_dropout(probs, dropout_p, training)
    return torch.matmul(probs, v), probs


# -- Hugging Face ---------------------------------------------------------------------------------------------
# keyword arguments some models pass to the attention function that change its result beyond what is implemented
UNSUPPORTED_KWARGS = ("sinks", "s_aux", "indices", "block_indices")


def hf_compressed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            position_bias=None, softcap=None, **kwargs):
    """AttentionInterface function: eager attention whose operands are fake-quantized by `module.attn_quant`.

    It takes what the models' own eager functions take (transformers 5.x): `position_bias` (T5 family: added to the
    scores), `softcap` (Gemma-2 family), grouped-query K/V heads. What would change the result and has no eager
    equivalent here is refused rather than silently dropped: attention sinks (gpt-oss) and the token indices that
    sparse-attention models (DeepSeek-V3.2 and kin) hand to kernels other than "eager"/"sdpa"."""
    refused = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if getattr(module, "sinks", None) is not None:
        refused.append("sinks (module attribute)")
    if refused:
        raise NotImplementedError(f"{type(module).__name__}: the compressed attention does not support {refused} "
                                  "(attention sinks, sparse-attention indices); prepare with "
                                  "quantize_attention=False to compress the linears only")
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat K/V heads as the eager path does
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    if position_bias is not None:
        attention_mask = position_bias if attention_mask is None else position_bias + attention_mask
    out, probs = attention_core(query, key, value, attention_mask, scaling, dropout, module.training,
                                getattr(module, "attn_quant", None), softcap)
    return out.transpose(1, 2).contiguous(), probs


_registered = False


def register_hf_attention() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(ATTN_IMPL, hf_compressed_attention)
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)  # additive float mask, as the eager path uses
    _registered = True


def use_hf_compressed_attention(model: nn.Module) -> bool:
    """Switch a transformers model to the "compressed" attention function; False if it has no HF attention."""
    attention = [m for m in model.modules() if is_hf_attention(m)]
    if not attention:
        return False
    register_hf_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPL)
    # transformers 5.17 does not pass the switch on to sub-models holding their own copy of a config of the same
    # class (T5's encoder and decoder stacks): switch those too
    for sub in model.modules():
        if sub is not model and hasattr(sub, "set_attn_implementation") and \
                getattr(sub.config, "_attn_implementation", ATTN_IMPL) != ATTN_IMPL:
            sub.set_attn_implementation(ATTN_IMPL)
    # what no set_attn_implementation reaches (ViT-MAE's decoder, a plain module with a deep copy of the config; HF
    # layers inside a plain nn.Module): each attention module looks the function up by its own config's name, so
    # naming it there is the switch
    for m in attention:
        if m.config._attn_implementation != ATTN_IMPL:
            m.config._attn_implementation = ATTN_IMPL
    return True


def is_hf_attention(module: nn.Module) -> bool:
    """A transformers attention module whose forward calls the registered attention function (5.x models look it
    up in ALL_ATTENTION_FUNCTIONS), so the "compressed" function will see its Q, K, V. Where the source cannot be
    read (a compiled or zipped install), modules holding query/key/value or q_proj/k_proj/v_proj linears count."""
    if not hasattr(module, "config"):
        return False
    calls = _calls_attention_interface(type(module))
    if calls is not None:
        return calls
    return any(all(isinstance(getattr(module, n, None), nn.Linear) for n in trio)
               for trio in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj")))


@functools.cache
def _calls_attention_interface(cls: type) -> bool | None:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source to read
        return None
    return "ALL_ATTENTION_FUNCTIONS" in src


# child linears that make a module attention-like whatever its class name (timm XCiT's XCA and ConViT's MHSA hold a
# fused qkv, ConViT's GPSA a fused qk and a v)
_QKV_NAMES = (("qkv",), ("qk", "v"), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"),
              ("q_lin", "k_lin", "v_lin"))


def _is_linear(mod) -> bool:
    return isinstance(mod, nn.Linear) or (mod is not None and as_linear(mod) is not None)


def unsupported_attention(model: nn.Module, supported) -> list[tuple[str, str]]:
    """(name, class) of attention-like modules that `supported(module)` rejects: their matmuls would stay
    unquantized, so prepare reports them. Attention-like: a class name containing "Attention" or "Attn" and a
    Q/K/V or output projection of its own (a child linear), or, under any class name, Q/K/V projection linears
    (`qkv`, `qk`/`v`, `query`/`key`/`value`, `q_proj`/`k_proj`/`v_proj`, `q`/`k`/`v`, `q_lin`/`k_lin`/`v_lin`)."""
    out = []
    for name, mod in model.named_modules():
        if supported(mod):
            continue
        named = re.search("Attention|Attn", type(mod).__name__) and any(_is_linear(c) for c in mod.children())
        if named or any(all(_is_linear(getattr(mod, n, None)) for n in trio) for trio in _QKV_NAMES):
            out.append((name, f"{type(mod).__module__}.{type(mod).__name__}"))
    return out


# -- timm -----------------------------------------------------------------------------------------------------
def _timm_classes() -> dict[type, type]:
    # A model holding timm's attention means timm is imported already: checking sys.modules spares HF-only runs
    # the import (~2.6 s per process here), and keeps timm optional for them
    return _timm_compressed_classes() if "timm" in sys.modules else {}


class _FromTimm:
    @classmethod
    def from_timm(cls, attn: nn.Module, quants: AttentionQuantizers | None):
        new = cls.__new__(cls)
        new.__dict__.update(attn.__dict__)  # same submodules and parameters, so state_dict keys are unchanged
        new.attn_quant = quants
        return new


@functools.cache
def _timm_compressed_classes() -> dict[type, type]:
    """{timm attention class: its subclass running the explicit path with `attn_quant` on the matmul operands}.
    Built on first use so that timm stays an optional import."""
    from timm.layers import Attention, apply_rot_embed_cat
    from timm.layers.attention import AttentionRope
    from timm.models.beit import Attention as BeitAttention
    from timm.models.eva import EvaAttention
    from timm.models.swin_transformer import WindowAttention

    def self_attn_mask(n, q, attn_mask, is_causal):
        """The additive mask of timm's explicit path (timm.layers.attention.resolve_self_attn_mask: a causal mask
        takes precedence over attn_mask; a bool mask keeps the True positions)."""
        if is_causal:
            return torch.full((n, n), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            return torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
        return attn_mask

    def qkv_heads(attn, x):
        """q, k, v (B, H, N, D) from the fused qkv, with BEiT/EVA's q/v biases added after it (see plan.py)."""
        B, N, _ = x.shape
        qkv = attn.qkv(x)
        if getattr(attn, "q_bias", None) is not None:
            qkv = qkv + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        return qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    class CompressedTimmAttention(_FromTimm, Attention):
        """timm's Attention (ViT, DeiT)."""

        def forward(self, x, attn_mask=None, is_causal=False):
            B, N, _ = x.shape
            gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
            q, k, v = qkv_heads(self, x)
            q, k = self.q_norm(q), self.k_norm(k)
            mask = self_attn_mask(N, q, attn_mask, is_causal)
            x, _ = attention_core(q, k, v, mask, self.scale, self.attn_drop.p, self.training, self.attn_quant)
            x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
            x = self.norm(x)
            if gate is not None:
                x = x * gate
            return self.proj_drop(self.proj(x))

    class CompressedWindowAttention(_FromTimm, WindowAttention):
        """timm's Swin WindowAttention: relative position bias, plus the shifted windows' 0/-inf mask."""

        def forward(self, x, mask=None):
            B_, N, _ = x.shape
            q, k, v = qkv_heads(self, x)
            bias = self._get_rel_pos_bias()  # (1, heads, N, N)
            if mask is not None:  # (windows, N, N), repeated over the batch as timm's fused path does
                num_win = mask.shape[0]
                mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, self.num_heads, -1, -1)
                bias = bias + mask.reshape(-1, self.num_heads, N, N)
            x, _ = attention_core(q, k, v, bias, self.scale, self.attn_drop.p, self.training, self.attn_quant)
            x = x.transpose(1, 2).reshape(B_, N, -1)
            return self.proj_drop(self.proj(x))

    class CompressedBeitAttention(_FromTimm, BeitAttention):
        """timm's BEiT Attention: q/v biases, relative position bias (its own and/or the model's shared one)."""

        def forward(self, x, shared_rel_pos_bias=None):
            B, N, _ = x.shape
            q, k, v = qkv_heads(self, x)
            bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
            if shared_rel_pos_bias is not None:
                bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
            x, _ = attention_core(q, k, v, bias, self.scale, self.attn_drop.p, self.training, self.attn_quant)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))

    def rope_forward(self, x, rope=None, attn_mask=None, is_causal=False):
        """EVA's and timm's AttentionRope: fused or separate q/k/v (grouped K/V heads), q/v biases (EVA), q/k norms,
        rotary embedding after the prefix tokens, optional gate."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            q, k, v = qkv_heads(self, x)
        else:
            q, k, v = (p(x).reshape(B, N, -1, self.head_dim).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q, k = (torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2)
                    .type_as(v) for t in (q, k))
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:  # after norm and rope, as timm does
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        x, _ = attention_core(q, k, v, self_attn_mask(N, q, attn_mask, is_causal), self.scale, self.attn_drop.p,
                              self.training, self.attn_quant)
        x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    CompressedEvaAttention = type("CompressedEvaAttention", (_FromTimm, EvaAttention), {"forward": rope_forward})
    CompressedAttentionRope = type("CompressedAttentionRope", (_FromTimm, AttentionRope), {"forward": rope_forward})

    return {Attention: CompressedTimmAttention, WindowAttention: CompressedWindowAttention,
            BeitAttention: CompressedBeitAttention, EvaAttention: CompressedEvaAttention,
            AttentionRope: CompressedAttentionRope}


def is_timm_attention(module: nn.Module) -> bool:
    """One of the timm attention classes the compressed attention covers: Attention (ViT, DeiT, ...), Swin's
    WindowAttention, BEiT's Attention, EvaAttention, AttentionRope (ViT-RoPE)."""
    return type(module) in _timm_classes()


def timm_compressed_attention(module: nn.Module, quants: AttentionQuantizers | None) -> nn.Module:
    """The explicit-path subclass of a supported timm attention module, sharing its submodules and parameters."""
    return _timm_classes()[type(module)].from_timm(module, quants)
