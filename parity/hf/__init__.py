"""Import one MoE layer of a Hugging Face checkpoint; run transformers' own block as a third reference.

Supported families (``config.json`` ``model_type``): one module per family in this package
(``mixtral``, ``qwen3_moe``, ``deepseek_v3``, ``olmoe``, ...; ``SUPPORTED_MODEL_TYPES``). A checkpoint
is a directory holding ``config.json`` and ``*.safetensors`` (one file, or shards listed by
``model.safetensors.index.json``). Two expert layouts are read (and the family layouts their modules
describe: Granite's and JetMoE's ``input_linear``, DBRX's flat ``experts.mlp.w1|v1|w2``, Gemma 4's
router and experts on the decoder layer, ``Family.layer_prefix``):

* per-expert tensors, as checkpoints on the hub store them (and as transformers 5 ``save_pretrained``
  writes them by default, ``save_original_format=True``): Mixtral
  ``model.layers.{L}.block_sparse_moe.experts.{e}.w1|w2|w3.weight``; Qwen3-MoE, OLMoE, DeepSeek-V3
  ``model.layers.{L}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``;
* the fused 3-D tensors of transformers 5 modules (``save_pretrained(..., save_original_format=False)``):
  ``model.layers.{L}.mlp.experts.gate_up_proj [E, 2I, D]`` (gate rows first, then up rows) and
  ``model.layers.{L}.mlp.experts.down_proj [E, D, I]``.

Block-quantised FP8 weights (DeepSeek-V3's release: ``float8_e4m3fn`` plus ``weight_scale_inv`` per
128x128 block) are dequantised to float32, and so are GPT-OSS's MXFP4 experts (``parity.hf.gpt_oss``). Only the tensors of the requested layer are read, through
``safetensors.safe_open`` (never pickle); dtypes NumPy lacks (BF16, F8_E4M3) are decoded from their
raw bytes, so reading needs neither torch nor transformers.

``read_hf_layer`` gives the canonical weights (DESIGN.md names and shapes, float32) and the
``MoEConfig`` that reproduces transformers' forward (see the README section "Hugging Face
checkpoints" for every semantic difference and the option that reproduces each side).
``hf_block`` / ``hf_forward`` build and run transformers' own MoE block (needs the ``hf`` extra).
Adding a family: a module ``parity/hf/<model_type>.py`` that calls ``registry.register(Family(...))``
(see ``registry.Family``), imported below, and a test in ``tests/parity/test_hf_families.py``.

Errors are ``HFImportError`` (a ``ValueError``).
"""

import importlib

from parity.hf.block import hf_block, hf_forward
from parity.hf.checkpoint import INDEX_FILE
from parity.hf.reader import (
    import_hf,
    is_moe_layer,
    load_hf_config,
    load_imported,
    moe_config_from_hf,
    moe_layer_indices,
    num_hidden_layers,
    read_hf_layer,
)
from parity.hf.registry import Family, HFImportError, get_family, register, supported_model_types

# the family modules, in the order error messages list them (each one registers its Family)
FAMILY_MODULES = ("mixtral", "qwen3_moe", "deepseek_v3", "olmoe", "glm4_moe", "dots1", "kimi_k2", "deepseek_v2",
                  "qwen2_moe", "qwen3_next", "granitemoe",
                  "llama4", "minimax_m2", "ernie4_5_moe", "gemma4", "dbrx", "jetmoe", "gpt_oss")
for _name in FAMILY_MODULES:
    importlib.import_module(f"parity.hf.{_name}")

SUPPORTED_MODEL_TYPES = supported_model_types()
# transformers' MoE block class per family (module, class), checked against transformers 5.24
HF_BLOCK_CLASSES = {t: get_family(t).block for t in SUPPORTED_MODEL_TYPES}

__all__ = ["FAMILY_MODULES", "Family", "HFImportError", "HF_BLOCK_CLASSES", "INDEX_FILE", "SUPPORTED_MODEL_TYPES",
           "get_family", "hf_block", "hf_forward", "import_hf", "is_moe_layer", "load_hf_config", "load_imported",
           "moe_config_from_hf", "moe_layer_indices", "num_hidden_layers", "read_hf_layer", "register",
           "supported_model_types"]
