"""The Llama text decoder (grouped-query attention, RoPE, RMSNorm), reading and writing a slot KV cache."""

from __future__ import annotations

import torch
from torch import nn

from idefix import native
from idefix.model.attention import AttentionBatch, KVCache, write_and_attend
from idefix.model.config import TextConfig
from idefix.model.layers import Bf16Linear, GatedMLP, RMSNorm, Rotary, apply_rotary, merged
from idefix.quant.linear import QuantLinear


class LlamaAttention(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        hidden, dim, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, dim
        self.q_proj = nn.Linear(hidden, self.heads * dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * dim, hidden, bias=bias)
        self.qkv_proj: QuantLinear | Bf16Linear | None = None  # q, k, v in one once `fuse_projections` merged them

    def fuse_projections(self) -> None:
        fused = merged([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        pools: tuple[torch.Tensor, torch.Tensor],
        at: AttentionBatch,
    ) -> torch.Tensor:
        n, heads, kv_heads, dim = x.shape[0], self.heads, self.kv_heads, self.head_dim
        if self.qkv_proj is None:
            q = apply_rotary(self.q_proj(x).view(n, heads, dim), *rope)  # [N, H, D]
            k = apply_rotary(self.k_proj(x).view(n, kv_heads, dim), *rope)  # [N, Hkv, D]
            v = self.v_proj(x).view(n, kv_heads, dim)
        else:
            # q's and k's heads lie side by side in the merged output: one rotary pass turns both.
            qkv = self.qkv_proj(x).view(n, heads + 2 * kv_heads, dim)
            qk = apply_rotary(qkv[:, : heads + kv_heads], *rope)
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
        return self.o_proj(write_and_attend(q, k, v, pools, at).reshape(n, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        pools: tuple[torch.Tensor, torch.Tensor],
        at: AttentionBatch,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, pools, at)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """`model.text_model` in the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        # Weights always come from the checkpoint: `_weight` skips the random init, whose normal_ on `meta`
        # imports torch._dynamo (a second or more of every load).
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)
        self._stack: native.DecodeStack | None = None  # built on the first decode step that can use it
        self._stack_checked = False

    def layer_devices(self) -> list[torch.device]:
        """Each decoder layer's device (they differ under a device map)."""
        return [layer.input_layernorm.weight.device for layer in self.decoder_layers()]

    def fuse_projections(self) -> None:
        """Merge each layer's q/k/v and gate/up projections into one layer each when they are quantized
        (QuantLinear.concat) or kept in bf16 (Bf16Linear.concat): fewer, larger kernel calls per decode step.
        fp32 layers stay apart (one GEMM call each is already near the bound, and joining them would copy them)."""
        for layer in self.decoder_layers():
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._stack, self._stack_checked = None, False  # the weights may move: look again
        return super()._apply(fn, recurse)

    def decode_stack(self) -> native.DecodeStack | None:
        """The layers as one native call for decode steps (native.DecodeStack), when every layer can run there: on
        the CPU, fp32 norms, q/k/v and gate/up merged, every product a native kind (bf16-kept or quantized Q8_0 /
        4-bit) without bias, SiLU. Checked once (again after the model moves)."""
        if not self._stack_checked:
            self._stack_checked = True
            self._stack = self._build_stack()
        return self._stack

    def _build_stack(self) -> native.DecodeStack | None:
        layers = self.decoder_layers()
        if not native.available() or len(layers) != len(self.layers) or self.config.hidden_act != "silu":
            return None
        specs = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            products = _native_specs([attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj])
            if products is None or any(w.dtype != torch.float32 or w.device.type != "cpu" for w in norms):
                return None
            specs.append((*norms, products))
        config = self.config
        return native.DecodeStack(
            specs, config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.rms_norm_eps
        )

    def decoder_layers(self) -> list[LlamaDecoderLayer]:
        return [layer for layer in self.layers if isinstance(layer, LlamaDecoderLayer)]

    def forward(self, embeds: torch.Tensor, cache: KVCache, at: AttentionBatch) -> torch.Tensor:
        """embeds [N, hidden] (flat new tokens, see AttentionBatch) -> final hidden states [N, hidden]."""
        rope = self.rotary(at.positions, embeds.dtype)
        d = at.plain_decode()
        fp32_cpu = embeds.device.type == "cpu" and embeds.dtype == cache.k[0].dtype == torch.float32
        if d is not None and fp32_cpu and d.count <= native.MAX_ROWS and (stack := self.decode_stack()) is not None:
            x = embeds.contiguous().clone()  # the stack works in place
            stack(x, rope[0][:, 0], rope[1][:, 0], (cache.k, cache.v), d.lo, d.context_len)
            return self.norm(x)
        x = embeds
        for i, layer in enumerate(self.layers):
            device = cache.k[i].device
            if x.device != device:  # a device-map boundary: activations and metadata hop once
                x, at = x.to(device), at.to(device)
                rope = (rope[0].to(device), rope[1].to(device))
            x = layer(x, rope, (cache.k[i], cache.v[i]), at)
        return self.norm(x.to(self.norm.weight.device))


def _native_specs(products: list[nn.Module | None]) -> tuple[native.LinearSpec, ...] | None:
    """Each product's native spec, or None unless every one is a native kind (bf16-kept, Q8_0 or 4-bit) without
    bias."""
    specs = []
    for product in products:
        if not isinstance(product, Bf16Linear | QuantLinear) or product.bias is not None:
            return None
        spec = product.native_spec()
        if spec is None:
            return None
        specs.append(spec)
    return tuple(specs)
