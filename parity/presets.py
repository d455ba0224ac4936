"""Presets: scaled-down MoE layers with the routing of real models.

Each preset keeps the *routing* of a published model (score function, top-k, groups, normalisation,
scaling, shared experts, balancing) exactly as its Hugging Face ``config.json`` states it, and scales
the *sizes* (model dim, expert hidden dim, sometimes the number of experts) down so that a parity run
takes seconds on a CPU. ``Preset.scaling`` says what was changed. The real models apply the routing
weights after the experts (``score_before_experts=False``), but Llama 4, which scales the expert
input (``score_before_experts=True``); the "default" preset keeps the original
PyTorch module's defaults (sigmoid, top-1, weights applied before the experts, the expert bias in
its "scale_first" order: what ``moe_torch.MoE(64, 128, 8)`` builds, the kernel aside).

Sources (``config.json`` of the named Hugging Face repositories):

- Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1): hidden_size 4096, intermediate_size 14336,
  num_local_experts 8, num_experts_per_tok 2, softmax over all experts then top-2 then renormalise,
  router_aux_loss_coef 0.02.
- DeepSeek-V3 (deepseek-ai/DeepSeek-V3): hidden_size 7168, moe_intermediate_size 2048,
  n_routed_experts 256, num_experts_per_tok 8, n_group 8, topk_group 4, scoring_func "sigmoid",
  topk_method "noaux_tc" (group score = sum of the two best biased scores), norm_topk_prob True,
  routed_scaling_factor 2.5, n_shared_experts 1, e_score_correction_bias (the expert bias),
  aux_loss_alpha 0.001 with seq_aux True (sequence-wise balance loss).
- DeepSeek-V2 (deepseek-ai/DeepSeek-V2): hidden_size 5120, moe_intermediate_size 1536,
  n_routed_experts 160, num_experts_per_tok 6, n_shared_experts 2, scoring_func "softmax",
  topk_method "group_limited_greedy" (group score = max), n_group 8, topk_group 3,
  routed_scaling_factor 16.0, norm_topk_prob False; expert-level balance factor 0.003
  (arXiv:2405.04434 sec. 4.1).
- DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite): hidden_size 2048, moe_intermediate_size 1408,
  n_routed_experts 64, num_experts_per_tok 6, n_shared_experts 2, scoring_func "softmax",
  norm_topk_prob False, routed_scaling_factor 1.0, aux_loss_alpha 0.001, seq_aux True. V2-Lite itself
  has n_group 1 / topk_method "greedy"; the preset uses the group-limited routing of DeepSeek-V2
  (topk_method "group_limited_greedy": group score = max, n_group 8, topk_group 3) so that the
  "max" group score is exercised.
- Qwen3-MoE (Qwen/Qwen3-30B-A3B): hidden_size 2048, moe_intermediate_size 768, num_experts 128,
  num_experts_per_tok 8, softmax, norm_topk_prob True, router_aux_loss_coef 0.001.
- OLMoE (allenai/OLMoE-1B-7B-0924): hidden_size 2048, intermediate_size 1024, num_experts 64,
  num_experts_per_tok 8, softmax, norm_topk_prob False, router_aux_loss_coef 0.01,
  router_z_loss_coef 0.001.
- Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B): hidden_size 2048, moe_intermediate_size 1408,
  shared_expert_intermediate_size 5632, num_experts 60, num_experts_per_tok 4, softmax,
  norm_topk_prob False, a sigmoid shared_expert_gate, router_aux_loss_coef 0.001.
- Qwen3-Next (Qwen/Qwen3-Next-80B-A3B-Instruct): hidden_size 2048, moe_intermediate_size 512,
  shared_expert_intermediate_size 512, num_experts 512, num_experts_per_tok 10, softmax,
  norm_topk_prob True, a sigmoid shared_expert_gate, router_aux_loss_coef 0.001.
- GLM-4.5 (zai-org/GLM-4.5): hidden_size 5120, moe_intermediate_size 1536, n_routed_experts 160,
  num_experts_per_tok 8, n_shared_experts 1, n_group 1, topk_group 1, norm_topk_prob True,
  routed_scaling_factor 2.5, e_score_correction_bias; DeepSeek-V3's router (``parity.hf.glm4_moe``).
- dots.llm1 (rednote-hilab/dots.llm1.base, arXiv:2506.05767): hidden_size 4096,
  moe_intermediate_size 1408, n_routed_experts 128, num_experts_per_tok 6, n_shared_experts 2,
  n_group 1, norm_topk_prob True, routed_scaling_factor 2.5, e_score_correction_bias.
- Kimi K2 (moonshotai/Kimi-K2-Instruct): DeepSeek-V3's architecture with hidden_size 7168,
  moe_intermediate_size 2048, n_routed_experts 384, num_experts_per_tok 8, n_shared_experts 1,
  n_group 1, topk_group 1, norm_topk_prob True, routed_scaling_factor 2.827.
- Granite-MoE (ibm-granite/granite-3.0-3b-a800m-base): hidden_size 1536, intermediate_size 512,
  num_local_experts 40, num_experts_per_tok 8, top-k of the logits then softmax over the k chosen
  (``parity.hf.granitemoe``), router_aux_loss_coef 0.001.
- Llama 4 Scout (meta-llama/Llama-4-Scout-17B-16E): hidden_size 5120, intermediate_size 8192,
  num_local_experts 16, num_experts_per_tok 1, interleave_moe_layer_step 1, sigmoid of the top-1
  logit times the expert input, one shared expert of intermediate_size, router_aux_loss_coef 0.001
  (``parity.hf.llama4``).
- MiniMax-M2 (MiniMaxAI/MiniMax-M2): hidden_size 3072, intermediate_size 1536, num_local_experts
  256, num_experts_per_tok 8, sigmoid scores, e_score_correction_bias, no groups, top-k weights
  divided by their bare sum (``parity.hf.minimax_m2``), router_aux_loss_coef 0.001.
- Ernie 4.5 MoE (baidu/ERNIE-4.5-21B-A3B-PT): hidden_size 2560, moe_intermediate_size 1536,
  moe_num_experts 64, moe_k 6, moe_num_shared_experts 2, softmax + e_score_correction_bias for
  selection, moe_norm_min 1e-12 (``parity.hf.ernie4_5_moe``).
- GPT-OSS (openai/gpt-oss-20b): hidden_size 2880, intermediate_size 2880, num_local_experts 32
  (gpt-oss-120b: 128), num_experts_per_tok 4, swiglu_limit 7.0 (swiglu_alpha 1.702, transformers'
  default); a router bias, expert biases, clamped SwiGLU, top-k of the logits then softmax over the
  k (``parity.hf.gpt_oss``).
"""

from __future__ import annotations

from dataclasses import dataclass

from parity.config import MoEConfig


@dataclass(frozen=True)
class Preset:
    """A named configuration with its provenance.

    ``source``: the model (Hugging Face repository) whose routing it copies; ``scaling``: what was
    scaled down and from what; ``notes``: deliberate deviations from the source.
    """

    name: str
    config: MoEConfig
    source: str
    scaling: str
    notes: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "default",
            MoEConfig(use_expert_bias=True, route_order="scale_first"),
            "the original PyTorch module's defaults: what moe_torch.MoE(64, 128, 8) builds",
            "none: MoEConfig's sizes (dim 64, hidden 128, 8 experts)",
            "sigmoid scores, top-1, routing weight applied to the expert input; the expert bias "
            "steers selection (use_expert_bias=True) in the original's order (route_order='scale_first')",
        ),
        Preset(
            "mixtral-8x7b",
            MoEConfig(dim=64, hidden_dim=224, num_experts=8, top_k=2, score_func="softmax",
                      route_norm=True, score_before_experts=False,
                      load_balance_loss="switch", load_balance_coeff=0.02),
            "mistralai/Mixtral-8x7B-v0.1",
            "dim 4096 -> 64, hidden 14336 -> 224 (same 3.5 ratio); 8 experts top-2 kept",
            "softmax over all experts then renormalised top-2 == softmax over the top-2 logits",
        ),
        Preset(
            "deepseek-v3",
            MoEConfig(dim=64, hidden_dim=16, num_experts=32, top_k=8, score_func="sigmoid",
                      route_norm=True, route_scale=2.5, num_expert_groups=8, num_limited_groups=4,
                      group_score="top2_sum", use_expert_bias=True, score_before_experts=False,
                      num_shared_experts=1, load_balance_loss="sequence", load_balance_coeff=0.001),
            "deepseek-ai/DeepSeek-V3",
            "dim 7168 -> 64, moe hidden 2048 -> 16, 256 -> 32 experts (8 groups of 4 instead of 32); "
            "top-8, 8 groups keep 4, 1 shared expert kept",
            "route_norm divides by sum + 1e-20 (HF adds 1e-20 too)",
        ),
        Preset(
            "deepseek-v2",
            MoEConfig(dim=64, hidden_dim=20, num_experts=160, top_k=6, score_func="softmax",
                      route_norm=False, route_scale=16.0, num_expert_groups=8, num_limited_groups=3,
                      group_score="max", score_before_experts=False, num_shared_experts=2,
                      load_balance_loss="sequence", load_balance_coeff=0.003),
            "deepseek-ai/DeepSeek-V2",
            "dim 5120 -> 64, moe hidden 1536 -> 20 (ratio ~3.3 kept); 160 experts top-6, 8 groups keep 3, "
            "2 shared experts kept",
            "transformers fills the dropped groups' scores with 0 where DESIGN uses -inf: the same "
            "experts and weights (softmax scores are > 0); the device- and communication-balance losses "
            "of the paper are not modelled",
        ),
        Preset(
            "deepseek-v2-lite",
            MoEConfig(dim=64, hidden_dim=48, num_experts=32, top_k=6, score_func="softmax",
                      route_norm=False, route_scale=1.0, num_expert_groups=8, num_limited_groups=3,
                      group_score="max", score_before_experts=False, num_shared_experts=2,
                      load_balance_loss="sequence", load_balance_coeff=0.001),
            "deepseek-ai/DeepSeek-V2-Lite (group-limited routing of deepseek-ai/DeepSeek-V2)",
            "dim 2048 -> 64, moe hidden 1408 -> 48, 64 -> 32 experts; top-6 and 2 shared experts kept",
            "V2-Lite has n_group=1; groups (8 keep 3, score = max) follow DeepSeek-V2's "
            "group_limited_greedy; route_scale 1.0 is V2-Lite's (V2 uses 16.0)",
        ),
        Preset(
            "qwen3-moe",
            MoEConfig(dim=64, hidden_dim=24, num_experts=128, top_k=8, score_func="softmax",
                      route_norm=True, score_before_experts=False,
                      load_balance_loss="switch", load_balance_coeff=0.001),
            "Qwen/Qwen3-30B-A3B",
            "dim 2048 -> 64, moe hidden 768 -> 24; 128 experts top-8 kept",
        ),
        Preset(
            "olmoe",
            MoEConfig(dim=64, hidden_dim=32, num_experts=64, top_k=8, score_func="softmax",
                      route_norm=False, score_before_experts=False,
                      load_balance_loss="switch", load_balance_coeff=0.01, router_z_loss_coeff=0.001),
            "allenai/OLMoE-1B-7B-0924",
            "dim 2048 -> 64, hidden 1024 -> 32; 64 experts top-8 kept",
            "no renormalisation of the top-8 weights (norm_topk_prob False)",
        ),
        Preset(
            "qwen2-moe",
            MoEConfig(dim=64, hidden_dim=44, num_experts=60, top_k=4, score_func="softmax",
                      route_norm=False, score_before_experts=False, num_shared_experts=1,
                      shared_hidden_dim=176, shared_expert_gate=True,
                      load_balance_loss="switch", load_balance_coeff=0.001),
            "Qwen/Qwen1.5-MoE-A2.7B",
            "dim 2048 -> 64, moe hidden 1408 -> 44, shared hidden 5632 -> 176 (ratios kept); 60 experts "
            "top-4 kept",
            "the shared expert is scaled per token by sigmoid(shared_expert_gate(x))",
        ),
        Preset(
            "qwen3-next",
            MoEConfig(dim=64, hidden_dim=16, num_experts=128, top_k=10, score_func="softmax",
                      route_norm=True, score_before_experts=False, num_shared_experts=1,
                      shared_hidden_dim=16, shared_expert_gate=True,
                      load_balance_loss="switch", load_balance_coeff=0.001),
            "Qwen/Qwen3-Next-80B-A3B-Instruct",
            "dim 2048 -> 64, moe and shared hidden 512 -> 16 (ratio kept), 512 -> 128 experts; top-10 kept",
            "the shared expert is scaled per token by sigmoid(shared_expert_gate(x))",
        ),
        Preset(
            "glm-4.5",
            MoEConfig(dim=64, hidden_dim=20, num_experts=160, top_k=8, score_func="sigmoid",
                      route_norm=True, route_scale=2.5, use_expert_bias=True, score_before_experts=False,
                      num_shared_experts=1),
            "zai-org/GLM-4.5",
            "dim 5120 -> 64, moe hidden 1536 -> 20 (ratio ~3.3 kept); 160 experts top-8, 1 shared kept",
            "DeepSeek-V3's router without groups (n_group 1); balancing by the expert bias only",
        ),
        Preset(
            "dots-llm1",
            MoEConfig(dim=64, hidden_dim=22, num_experts=128, top_k=6, score_func="sigmoid",
                      route_norm=True, route_scale=2.5, use_expert_bias=True, score_before_experts=False,
                      num_shared_experts=2),
            "rednote-hilab/dots.llm1.base",
            "dim 4096 -> 64, moe hidden 1408 -> 22 (ratio ~2.9 kept); 128 experts top-6, 2 shared kept",
            "DeepSeek-V3's router without groups (n_group 1); balancing by the expert bias only",
        ),
        Preset(
            "kimi-k2",
            MoEConfig(dim=64, hidden_dim=18, num_experts=48, top_k=8, score_func="sigmoid",
                      route_norm=True, route_scale=2.827, use_expert_bias=True, score_before_experts=False,
                      num_shared_experts=1),
            "moonshotai/Kimi-K2-Instruct",
            "dim 7168 -> 64, moe hidden 2048 -> 18 (ratio 3.5 kept), 384 -> 48 experts; top-8, 1 shared kept",
            "DeepSeek-V3's router without groups (n_group 1, topk_group 1); its config.json declares "
            "model_type 'kimi_k2' (custom code), read by parity.hf as DeepSeek-V3",
        ),
        Preset(
            "granite-moe",
            MoEConfig(dim=64, hidden_dim=22, num_experts=40, top_k=8, score_func="softmax",
                      route_norm=True, score_before_experts=False,
                      load_balance_loss="switch", load_balance_coeff=0.001),
            "ibm-granite/granite-3.0-3b-a800m-base",
            "dim 1536 -> 64, hidden 512 -> 22 (ratio ~1/3 kept); 40 experts top-8 kept",
            "top-k of the logits then softmax over the k chosen = softmax -> top-k -> renormalise",
        ),
        Preset(
            "llama4-scout",
            MoEConfig(dim=64, hidden_dim=102, num_experts=16, top_k=1, score_func="sigmoid",
                      route_norm=False, score_before_experts=True, num_shared_experts=1,
                      load_balance_loss="switch", load_balance_coeff=0.001),
            "meta-llama/Llama-4-Scout-17B-16E",
            "dim 5120 -> 64, expert and shared hidden 8192 -> 102 (ratio 1.6 kept); 16 experts top-1 kept",
            "top-1 of the logits then sigmoid = sigmoid -> top-1 (no renormalisation); the score scales the "
            "expert input; one ungated shared expert",
        ),
        Preset(
            "minimax-m2",
            MoEConfig(dim=64, hidden_dim=32, num_experts=64, top_k=8, score_func="sigmoid",
                      route_norm=True, route_norm_eps=0.0, use_expert_bias=True, score_before_experts=False,
                      load_balance_loss="switch", load_balance_coeff=0.001),
            "MiniMaxAI/MiniMax-M2",
            "dim 3072 -> 64, hidden 1536 -> 32 (ratio 1/2 kept), 256 -> 64 experts; top-8 kept",
            "sigmoid + expert bias for selection, no groups; renormalised by the bare sum (route_norm_eps 0)",
        ),
        Preset(
            "ernie-4.5-moe",
            MoEConfig(dim=64, hidden_dim=38, num_experts=64, top_k=6, score_func="softmax",
                      route_norm=True, route_norm_mode="clamp", route_norm_eps=1e-12, use_expert_bias=True,
                      score_before_experts=False, num_shared_experts=2,
                      load_balance_loss="switch", load_balance_coeff=0.001),
            "baidu/ERNIE-4.5-21B-A3B-PT",
            "dim 2560 -> 64, moe hidden 1536 -> 38 (ratio 0.6 kept); 64 experts top-6, 2 shared kept",
            "softmax + expert bias for selection; renormalised by clamp(sum, min=1e-12)",
        ),
        Preset(
            "gemma4-26b-a4b",
            MoEConfig(dim=64, hidden_dim=16, num_experts=64, top_k=8, score_func="softmax", route_norm=True,
                      route_norm_eps=0.0, router_input_norm=True, per_expert_scale=True, expert_input_norm=True,
                      input_norm_eps=1e-6, expert_activation="gelu_tanh", score_before_experts=False),
            "google/gemma-4-26B-A4B",
            "dim 2816 -> 64, moe hidden 704 -> 16 (ratio 1/4 kept), 128 -> 64 experts; top-8 kept",
            "router input rms_norm(x) * router.scale * dim**-0.5; softmax, top-8, bare-sum renormalisation, times "
            "router.per_expert_scale; GeGLU (tanh) experts on rms_norm(x) * expert_input_norm.weight; the dense "
            "MLP beside the MoE block is outside the layer",
        ),
        Preset(
            "dbrx",
            MoEConfig(dim=64, hidden_dim=112, num_experts=16, top_k=4, score_func="softmax", route_norm=True,
                      route_norm_p=1.0, route_norm_eps=0.0, score_before_experts=False,
                      load_balance_loss="switch", load_balance_coeff=0.05),
            "databricks/dbrx-base",
            "dim 6144 -> 64, hidden 10752 -> 112 (ratio 1.75 kept); 16 experts top-4 kept",
            "softmax, top-4, divided by the p-norm of the 4 weights (moe_normalize_expert_weights 1: the sum), "
            "no epsilon; moe_loss_weight 0.05",
        ),
        Preset(
            "jetmoe-8b",
            MoEConfig(dim=64, hidden_dim=176, num_experts=8, top_k=2, score_func="softmax", route_norm=True,
                      expert_proj_bias=True, score_before_experts=False,
                      load_balance_loss="switch", load_balance_coeff=0.01),
            "jetmoe/jetmoe-8b",
            "dim 2048 -> 64, hidden 5632 -> 176 (ratio 2.75 kept); 8 experts top-2 kept",
            "top-2 of the logits then softmax over the 2 (= softmax, top-2, renormalise); the layer's output "
            "bias as experts.b2 (the same row for every expert); its attention experts (MoA) are not an MoE "
            "MLP layer",
        ),
        Preset(
            "gpt-oss",
            MoEConfig(dim=64, hidden_dim=64, num_experts=32, top_k=4, score_func="softmax", route_norm=True,
                      router_bias=True, expert_proj_bias=True, expert_activation="clamped_swiglu",
                      swiglu_alpha=1.702, swiglu_limit=7.0, score_before_experts=False),
            "openai/gpt-oss-20b",
            "dim 2880 -> 64, hidden 2880 -> 64 (ratio 1 kept); 32 experts top-4 kept (gpt-oss-120b: 128)",
            "router Linear with a bias; top-4 of the logits then softmax over the 4 (= softmax, top-4, "
            "renormalise); expert biases; clamped SwiGLU (alpha 1.702, limit 7); gate/up interleaved in the "
            "checkpoint",
        ),
        # capacity and token dropping (DESIGN.md step 6a): the combinations of four public codebases
        Preset(
            "megatron-capacity",
            MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, score_func="softmax", route_norm=True,
                      score_before_experts=False, load_balance_loss="switch", load_balance_coeff=0.01,
                      capacity_factor=1.0, capacity_group="batch", capacity_rounding="megatron",
                      capacity_policy="probs", capacity_stats="kept"),
            "Megatron-Core (NVIDIA/Megatron-LM, megatron/core/transformer/moe): moe_expert_capacity_factor 1.0, "
            "moe_token_drop_policy 'probs', moe_pad_expert_input_to_capacity False",
            "dim 64, hidden 128, 8 experts top-2 (a Mixtral-like router: top-k of the logits, softmax over the k)",
            "C = ceil(T*k/E*cf) over one rank's micro-batch (group 'batch'); each expert keeps its C largest "
            "weights (ties: token, then slot); counts and aux loss from the routing after dropping",
        ),
        Preset(
            "maxtext-capacity",
            MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, score_func="softmax", route_norm=True,
                      score_before_experts=False, load_balance_loss="switch", load_balance_coeff=0.01,
                      capacity_factor=1.25, capacity_group="sequence", capacity_rounding="maxtext",
                      capacity_policy="position", capacity_pad=True, capacity_stats="selected"),
            "MaxText (AI-Hypercomputer/maxtext, layers/moe.py, dense_matmul path) with capacity_factor 1.25",
            "dim 64, hidden 128, 8 experts top-2 (a Mixtral-like router, as MaxText's Mixtral configs)",
            "C = int(max(ceil(S*k/E)*cf, cf)) per sequence; first come, first served over (token, slot); "
            "[E, C] buffers; the aux loss sees the routing before dropping; survivors not renormalised",
        ),
        Preset(
            "gshard",
            MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, score_func="softmax", route_norm=True,
                      score_before_experts=False, load_balance_loss="switch", load_balance_coeff=0.01,
                      capacity_factor=1.0, capacity_group="batch", capacity_rounding="gshard", capacity_min=4,
                      capacity_policy="slot_major", capacity_pad=True, capacity_renorm=True,
                      capacity_stats="selected"),
            "GShard top-2 gating (Lepikhin et al. 2020, arXiv:2006.16668, Algorithm 1)",
            "dim 64, hidden 128, 8 experts top-2; min_capacity 4 (Tutel / DeepSpeed's default)",
            "C = max(ceil(T/E*2*cf), 4); every first choice before any second choice; the survivors' "
            "weights renormalised; the paper's random second-expert dispatch is not modelled, and its "
            "aux loss counts first choices only where this one counts both slots",
        ),
        Preset(
            "switch",
            MoEConfig(dim=64, hidden_dim=256, num_experts=8, top_k=1, score_func="softmax",
                      score_before_experts=False, load_balance_loss="switch", load_balance_coeff=0.001,
                      router_z_loss_coeff=0.001, expert_capacity=2, capacity_group="sequence",
                      capacity_policy="position", capacity_stats="kept"),
            "google/switch-base-8 (transformers SwitchTransformers)",
            "dim 768 -> 64, d_ff 3072 -> 256 (ratio 4 kept), 8 experts top-1; expert_capacity 64 (for "
            "512-token sequences) -> 2",
            "a fixed capacity per sequence, first come, first served; the aux loss sees the kept routing; "
            "transformers passes a dropped token's input through times its probability, here it gets zero",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
