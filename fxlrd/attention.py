"""``nn.MultiheadAttention`` in a form whose projections are layer sites.

``torch.nn.MultiheadAttention`` hides its q/k/v projection inside a fused functional call
(and a fast path that is one native op), so neither torch.fx nor torch.export shows it as a
linear layer. Before capture fxlrd swaps each supported instance for `MultiheadAttention`
below: the same parameters under the same names, the same results (checked in the tests
against torch's), with a forward written in plain ops — ``F.linear`` for the projections,
``F.scaled_dot_product_attention`` for the attention.

Two layouts of the q/k/v projection:

- ``"packed"`` (default): one ``(3E, E)`` projection, ``in_proj_weight`` as torch keeps it.
  Decomposed as one matrix: ``x → r → 3E``, two GEMMs for q, k and v together, and q, k, v
  share the input factor. Fastest on CPU (two larger GEMMs instead of six small ones); the
  shared input subspace costs a little accuracy at equal parameters when q, k and v use
  different directions of the input. Self-attention only (the projection then reads one
  input): an attention that runs as cross-attention during capture is captured again in the
  separate layout.
- ``"separate"``: three ``(E, E)`` projections ``q_proj``, ``k_proj``, ``v_proj`` (their state-dict
  keys replace ``in_proj_weight``/``in_proj_bias``), each decomposed on its own: each keeps its own
  subspace (lower error at equal parameters on trained weights), six GEMMs. Works for
  cross-attention too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["MultiheadAttention", "swap_attention", "separate_cross_attention", "ATTENTION_LAYOUTS"]

ATTENTION_LAYOUTS = ("packed", "separate")


@fx.wrap
def _additive_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A boolean mask (True = do not attend) or an additive float mask, as a float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


@fx.wrap
def _batch_first(x: torch.Tensor, query: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """``x`` (a query, key or value) as (N, L, E). As in ``nn.MultiheadAttention``, ``query``'s
    rank decides the layout: 3-D is batched ((N, L, E) with ``batch_first``, else (L, N, E)),
    2-D is one unbatched sequence (L, E) whatever ``batch_first`` says. A function (kept whole
    by torch.fx) because the rank of a traced input is only known when the graph runs."""
    if query.dim() not in (2, 3):
        raise ValueError(f"query should be unbatched 2-D or batched 3-D, got a {query.dim()}-D tensor")
    if x.dim() != query.dim():
        raise ValueError(f"for a {query.dim()}-D query, key and value must be {query.dim()}-D too, got {x.dim()}-D")
    if query.dim() == 2:
        return x.unsqueeze(0)
    return x if batch_first else x.transpose(0, 1)


@fx.wrap
def _from_batch_first(x: torch.Tensor, query: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """An (N, ...) result back in ``query``'s layout: unbatched (its batch of one squeezed),
    or batched, sequence first unless ``batch_first``."""
    if query.dim() == 2:
        return x.squeeze(0)
    return x if batch_first else x.transpose(0, 1)


@fx.wrap
def _combined_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, q: torch.Tensor,
                   k: torch.Tensor, num_heads: int, query: torch.Tensor,
                   is_causal: bool = False) -> torch.Tensor | None:  # fmt: skip
    """``attn_mask`` ((L, S), (N·H, L, S), or (H, L, S) for an unbatched ``query``) and
    ``key_padding_mask`` ((N, S), or (S,) unbatched) as one additive mask broadcastable to
    (N, H, L, S), as ``nn.MultiheadAttention`` combines them; ``is_causal`` without an
    ``attn_mask``: the causal mask. None when there is no mask: under torch.fx either mask may
    be an optional input that is None when the graph runs."""
    batched = query.dim() == 3
    n = q.shape[0]
    out = None
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise ValueError(f"attn_mask should be None, 2-D or 3-D, got a {attn_mask.dim()}-D tensor")
        m = _additive_mask(attn_mask, q)
        out = m.view(n, num_heads, m.shape[-2], m.shape[-1]) if m.dim() == 3 else m
    elif is_causal:  # (with an attn_mask, is_causal is a hint that it is the causal mask, as in torch)
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        out = _additive_mask(causal, q)
    if key_padding_mask is not None:
        if key_padding_mask.dim() != (2 if batched else 1):
            raise ValueError(f"key_padding_mask should be None or {2 if batched else 1}-D for a {query.dim()}-D "
                             f"query, got a {key_padding_mask.dim()}-D tensor")  # fmt: skip
        kpm = _additive_mask(key_padding_mask, q)
        kpm = (kpm if batched else kpm[None])[:, None, None, :]
        out = kpm if out is None else out + kpm
    return out


@fx.wrap
def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``scores + mask``; ``scores`` when the mask (an optional input under torch.fx) is None."""
    return scores if mask is None else scores + mask


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with a traceable forward and the same parameters.

    Supports what vision and language models use: ``batch_first`` either way, unbatched
    (2-D) inputs, key/value of the same width as the query, ``key_padding_mask``,
    ``attn_mask`` (bool or float), ``need_weights`` (averaged or per head), ``is_causal``,
    dropout. Masks may be optional inputs (None) of a model captured with torch.fx.
    """

    # torch's TransformerEncoderLayer and TransformerEncoder take a fused fast path (reading
    # in_proj_weight directly, never calling this forward) only when this is True. False keeps
    # every call on this forward, the one fxlrd captures and decomposes.
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, layout: str = "packed", device=None, dtype=None):  # fmt: skip
        super().__init__()
        if layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention layout must be one of {ATTENTION_LAYOUTS}, got {layout!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first, self.layout = dropout, batch_first, layout
        kw = {"device": device, "dtype": dtype}
        if layout == "packed":
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **kw)) if bias else None
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim, bias=bias, **kw) for _ in range(3))
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.cross_attention = False  # set when a packed forward ran with query, key, value not one tensor

    @classmethod
    def from_torch(cls, mha: "nn.MultiheadAttention | MultiheadAttention",
                   layout: str = "packed") -> "MultiheadAttention":  # fmt: skip
        """The same attention as ``mha``, sharing its parameters (``packed``) or copying them
        into three projections (``separate``)."""
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=bias, batch_first=mha.batch_first,
                  layout=layout, device="meta")  # fmt: skip
        if layout == "packed":
            new.in_proj_weight, new.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        else:
            e = mha.embed_dim
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight = nn.Parameter(mha.in_proj_weight.detach()[i * e : (i + 1) * e].clone(),
                                           requires_grad=mha.in_proj_weight.requires_grad)  # fmt: skip
                if bias:
                    proj.bias = nn.Parameter(mha.in_proj_bias.detach()[i * e : (i + 1) * e].clone(),
                                             requires_grad=mha.in_proj_bias.requires_grad)  # fmt: skip
        new.out_proj = mha.out_proj
        new.train(mha.training)
        return new

    def separate(self) -> "MultiheadAttention":
        """This packed attention in the ``separate`` layout (the same attention, its q/k/v
        projections copied out of ``in_proj_weight``): what a cross-attention is captured as."""
        return MultiheadAttention.from_torch(self, "separate")  # (it has the attributes from_torch reads)

    @staticmethod
    def supports(mha: nn.MultiheadAttention) -> bool:
        """Whether ``mha`` uses only what this module implements."""
        return bool(mha._qkv_same_embed_dim) and mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn

    def _project(self, query, key, value):
        if self.layout == "separate":
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if query is key and key is value:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        self.cross_attention = True  # (capture then swaps in the separate layout: these projections are no sites)
        w = self.in_proj_weight.chunk(3)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):  # fmt: skip
        self_attention = query is key and key is value
        source = query  # its rank tells batched (3-D) from unbatched (2-D), as in torch
        query = _batch_first(query, source, self.batch_first)  # (N, L, E)
        if self_attention:
            key = value = query
        elif key is value:  # cross-attention: one node feeds both projections (siblings to fuse)
            key = value = _batch_first(key, source, self.batch_first)
        else:
            key, value = _batch_first(key, source, self.batch_first), _batch_first(value, source, self.batch_first)
        q, k, v = self._project(query, key, value)
        heads = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)  # (N, H, L, D)
        mask = None
        # A Python check: a mask given as None is no mask. Under torch.fx a mask may also be an
        # optional input, a Proxy here that is None when the graph runs: the helpers take None.
        if attn_mask is not None or key_padding_mask is not None or (is_causal and need_weights):
            mask = _combined_mask(attn_mask, key_padding_mask, q, k, self.num_heads, source, is_causal)
            is_causal = False  # (in the mask now)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            if mask is not None:
                scores = _masked(scores, mask)
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = _from_batch_first(weights.mean(1) if average_attn_weights else weights, source, True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        out = _from_batch_first(self.out_proj(out.transpose(1, 2).flatten(-2)), source, self.batch_first)
        return out, weights


def separate_cross_attention(model: nn.Module) -> int:
    """Swap each packed `MultiheadAttention` of ``model`` that ran as cross-attention (since
    its swap) for its ``separate`` layout, in place; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiheadAttention) and module.layout == "packed" and module.cross_attention and name:
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module.separate())
            count += 1
    return count


def swap_attention(model: nn.Module, layout: str = "packed") -> int:
    """Replace every supported ``nn.MultiheadAttention`` in ``model`` (in place) by
    `MultiheadAttention`; returns how many were replaced."""
    if layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}, got {layout!r}")
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.MultiheadAttention and MultiheadAttention.supports(module):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not parent_name and not leaf:
                continue  # the model itself is the attention: nothing to swap it in
            setattr(parent, leaf, MultiheadAttention.from_torch(module, layout))
            count += 1
    if count:  # nn.TransformerEncoder packs padded batches into nested tensors, which the swapped module cannot take
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder):
                module.enable_nested_tensor = module.use_nested_tensor = False
    return count
