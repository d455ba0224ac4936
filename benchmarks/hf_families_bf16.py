"""bfloat16 differences between transformers' MoE block, moe_torch and the float64 reference (README,
"Where transformers and DESIGN.md differ"), for the families added by issue 15.

Per family: a random model built with transformers (D=64, 16 experts, top-4, layer 1 MoE; MoE weights
scaled like a trained layer), 256 bf16 tokens; prints how many tokens each pair routes to a different
expert set and the largest output difference in bf16 ULPs of the output's largest value (also on
the tokens both route alike). moe_torch runs cast to bf16, its router kept float32 (and reloaded)
where transformers keeps it so. CPU, about a minute: ``python benchmarks/hf_families_bf16.py``
(``python benchmarks/hf_families_bf16.py gemma4_text dbrx``: those families only).
"""

import json
import sys
import tempfile

import numpy as np
import torch
import transformers

import moe_torch
from parity import reference
from parity.hf import get_family, hf_block, hf_forward, read_hf_layer

D, H, E = 64, 48, 16
common = dict(vocab_size=32, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              max_position_embeddings=32, eos_token_id=1, bos_token_id=0, pad_token_id=None)
mla = dict(kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)
dsv3 = dict(intermediate_size=32, moe_intermediate_size=H, n_routed_experts=E, num_experts_per_tok=4, n_group=4,
            topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1)
qwen = dict(intermediate_size=32, moe_intermediate_size=H, shared_expert_intermediate_size=40, num_experts=E,
            num_experts_per_tok=4, mlp_only_layers=[0], decoder_sparse_step=1)
dsv2 = dict(intermediate_size=32, moe_intermediate_size=H, n_routed_experts=E, num_experts_per_tok=4,
            n_shared_experts=2, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            routed_scaling_factor=16.0, **mla)
cases = {
    "glm4_moe": transformers.Glm4MoeConfig(**common, **dsv3, head_dim=32),
    "dots1": transformers.Dots1Config(**common, **dsv3, head_dim=32),
    "kimi_k2(deepseek_v3, n_group=1)": transformers.DeepseekV3Config(**common, **dict(dsv3, n_group=1, topk_group=1), **mla),
    "deepseek_v2": transformers.DeepseekV2Config(**common, **dsv2),
    "qwen2_moe": transformers.Qwen2MoeConfig(**common, **qwen, norm_topk_prob=False),
    "qwen3_next": transformers.Qwen3NextConfig(**common, **qwen, norm_topk_prob=True, head_dim=32,
                                               linear_num_key_heads=2, linear_num_value_heads=2,
                                               linear_key_head_dim=16, linear_value_head_dim=16),
    "granitemoe": transformers.GraniteMoeConfig(**common, intermediate_size=H, num_local_experts=E,
                                                num_experts_per_tok=4),
    "llama4_text": transformers.Llama4TextConfig(**common, head_dim=32, intermediate_size=H, intermediate_size_mlp=32,
                                                 num_local_experts=E, num_experts_per_tok=4,
                                                 interleave_moe_layer_step=2),
    "minimax_m2": transformers.MiniMaxM2Config(**common, head_dim=32, intermediate_size=H, num_local_experts=E,
                                               num_experts_per_tok=4),
    "ernie4_5_moe": transformers.Ernie4_5_MoeConfig(**common, head_dim=32, intermediate_size=32,
                                                    moe_intermediate_size=H, moe_num_experts=E, moe_k=4,
                                                    moe_num_shared_experts=2, moe_layer_start_index=1),
    "gpt_oss": transformers.GptOssConfig(**common, head_dim=32, intermediate_size=H, num_local_experts=E,
                                         num_experts_per_tok=4),
    "gemma4_text": transformers.Gemma4TextConfig(**common, head_dim=32, intermediate_size=32, enable_moe_block=True,
                                                 num_experts=E, top_k_experts=4, moe_intermediate_size=H,
                                                 hidden_size_per_layer_input=0, vocab_size_per_layer_input=32),
    "dbrx": transformers.DbrxConfig(vocab_size=32, d_model=D, n_heads=2, n_layers=2, max_seq_len=32,
                                    attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
                                    ffn_config=dict(ffn_hidden_size=H, moe_num_experts=E, moe_top_k=4,
                                                    moe_normalize_expert_weights=1.0)),
    "jetmoe": transformers.JetMoeConfig(vocab_size=32, hidden_size=D, num_hidden_layers=2, num_key_value_heads=2,
                                        kv_channels=16, intermediate_size=H, num_local_experts=E,
                                        num_experts_per_tok=4, max_position_embeddings=32),
}
# the MoE tensors of each model (Gemma 4's router and experts sit on the decoder layer; DBRX's under ffn)
MOE_PARTS = (".mlp.", ".block_sparse_moe.", ".feed_forward.", ".router.", ".experts.", ".ffn.",
             "pre_feedforward_layernorm_2")


def hf_experts(block, family, x):
    """transformers' chosen experts [N, k] of ``x [N, D]``."""
    router = getattr(block, family.router_name)
    if family.model_type == "dbrx":  # logits only; the block routes
        return block.route_tokens_to_experts(router(x))[1]
    if family.model_type == "jetmoe":  # (sorted slots, ...): top-k of the float32 logits, as its gating does
        return router.layer(x).float().topk(router.top_k, dim=1).indices
    if family.model_type == "llama4_text":  # (scores, logits): top-k of the logits
        return router(x)[1].topk(block.top_k, dim=-1).indices
    if family.model_type == "minimax_m2":  # the bias is the block's
        return router(x, block.e_score_correction_bias)[2]
    return router(x)[2]


rows = {}
for name, hcfg in cases.items():
    if sys.argv[1:] and name not in sys.argv[1:]:  # families named on the command line only
        continue
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hcfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not any(m in n for m in MOE_PARTS):
                continue
            if p.ndim == 1 and not n.endswith("bias"):  # scales and norm weights (Gemma 4) around 1
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    d = tempfile.mkdtemp()
    model.save_pretrained(d)
    cfg, w = read_hf_layer(d, 1)
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((4, 64, D)).astype(np.float32)).bfloat16()
    xf = x.float().numpy()
    # float64 reference on bf16-rounded weights (router kept f32 where transformers keeps it)
    family = get_family(hcfg.model_type if not name.startswith("kimi") else "deepseek_v3")
    keep = ("router.gate.weight", "expert_bias") if family.fp32_router else ("expert_bias",)
    wr = {k: v if k in keep else torch.from_numpy(v).bfloat16().float().numpy() for k, v in w.items()}
    ref, aux = reference.moe_forward(wr, xf, cfg)
    block = hf_block(d, 1, dtype="bfloat16")
    y_hf = hf_forward(block, xf)
    with torch.no_grad():
        hf_idx = hf_experts(block, family, x.reshape(-1, D))
    moe = moe_torch.MoE(**cfg.to_kwargs())
    moe.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    moe.to(torch.bfloat16)
    if family.fp32_router:
        moe.router.float()
        moe.router.gate.weight.data.copy_(torch.from_numpy(w["router.gate.weight"]))
    moe.eval()
    with torch.no_grad():
        y_t, aux_t = moe(x, return_aux=True)
    y_t = y_t.float().numpy()
    scale = np.abs(ref).max()
    ulp = 2.0 ** (np.floor(np.log2(scale)) - 7)  # bf16 ULP at the output's largest value
    hf_sets = np.sort(hf_idx.numpy(), -1)
    ours = np.sort(aux_t["selected_experts"].numpy(), -1)
    refs = np.sort(aux["selected_experts"], -1)
    rows[name] = dict(
        tokens=int(x.shape[0] * x.shape[1]),
        routed_differently_hf_vs_torch=int((hf_sets != ours).any(-1).sum()),
        routed_differently_hf_vs_ref=int((hf_sets != refs).any(-1).sum()),
        max_ulp_at_scale_hf_vs_torch=float(np.abs(y_hf - y_t).max() / ulp),
        max_ulp_at_scale_hf_vs_ref=float(np.abs(y_hf - ref).max() / ulp),
        max_ulp_at_scale_torch_vs_ref=float(np.abs(y_t - ref).max() / ulp),
        max_ulp_at_scale_hf_vs_torch_same_routing=float(
            np.abs(y_hf - y_t).reshape(-1, D)[~(hf_sets != ours).any(-1)].max() / ulp),
    )
    print(name, json.dumps(rows[name]), flush=True)
