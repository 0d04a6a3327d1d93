"""Port of the opendelta section of the original's examples/examples_prompt/src/run.py, once per
config of examples/examples_prompt/configs/ (their delta arguments verbatim). Only model loading
changed: tiny models of the configs' families from transformers configs. The script's own
DeltaArguments fields (backbone_model, finetuned_delta_path, delay_push...) reach
AutoDeltaConfig.from_dict with the delta's, as in the original."""

from dataclasses import asdict, dataclass, field
from typing import List, Optional

import pytest
import torch
import transformers as tf
from compat_models import IDS, outputs, train_a_little

from opendelta.leniency import OriginalBehaviourWarning

LN = ["deltas", "layer_norm", "final_layer_norm"]
# config name -> the delta arguments of its JSON file
CONFIGS = {
    "adapter_clip-vit-base-patch32/beans": dict(delta_type="adapter", bottleneck_dim=24, unfrozen_modules=LN),
    "adapter_opt-350m/wikitext": dict(delta_type="adapter", backbone_model="opt", bottleneck_dim=24, unfrozen_modules=LN, modified_modules=["self_attn"]),
    "adapter_vit-large-patch16-224-in21k/beans": dict(delta_type="adapter", backbone_model="vit", bottleneck_dim=24, unfrozen_modules=LN, modified_modules=["output"]),
    "bitfit_t5-large/rte": dict(delta_type="bitfit", backbone_model="t5-large", unfrozen_modules=LN, modified_modules=["attn", "ff", "layer_norm"]),
    "compacter_blenderbot-3b/sst2": dict(delta_type="compacter", backbone_model="blenderbot", non_linearity="gelu_new", unfrozen_modules=LN, modified_modules=["fc2"]),
    "compacter_deberta-v2-xlarge/mnli": dict(delta_type="compacter", backbone_model="deberta-v2-xlarge", unfrozen_modules=LN, modified_modules=["attention"]),
    "compacter_long-t5-tglobal-large/rte": dict(delta_type="compacter", backbone_model="long-t5", unfrozen_modules=LN, modified_modules=["attn", "ff", "layer_norm"]),
    "lora_beit-large-patch16-224/cifar10": dict(delta_type="lora", backbone_model="beit", unfrozen_modules=LN, modified_modules=["query", "value"]),
    "lora_gpt-j-6B/wikitext": dict(delta_type="lora", backbone_model="gpt-j", unfrozen_modules=LN, modified_modules=[f"{i}.attn.q_proj" for i in range(20, 28)]),
    "lora_roberta-large/superglue-boolq": dict(delta_type="lora", backbone_model="roberta-large", unfrozen_modules=LN, modified_modules=["query", "value"]),
    "lora_xlm-roberta-large/superglue-wic": dict(delta_type="lora", backbone_model="xlm-roberta-large", unfrozen_modules=LN, modified_modules=["query", "value"]),
    "low_rank_adapter_gpt2/wikitext": dict(delta_type="low_rank_adapter", backbone_model="gpt2", unfrozen_modules=LN, modified_modules=["attn", "mlp"]),
    "prefix_bert-large-cased/rte": dict(delta_type="prefix", backbone_model="bert-large-cased", unfrozen_modules=LN, modified_modules=["attention"]),
    "soft_prompt_bart-large/superglue-boolq": dict(delta_type="soft_prompt", backbone_model="bart", soft_token_num=100, unfrozen_modules=["deltas"]),
}

H = 64  # Compacter's defaults (reduction 16, 4 divisions) need a multiple of 64
PIXELS = {"pixel_values": torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)}
TEXT = {"input_ids": IDS}
SEQ2SEQ = {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]}
VISION = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=16, patch_size=8)
SEQ = dict(vocab_size=99, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
           encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=256)
# family -> (model, inputs)
MODELS = {
    "clip": (lambda: tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37),
        vision_config=VISION, projection_dim=16)), {**TEXT, **PIXELS}),
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=99, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                                   ffn_dim=37, word_embed_proj_dim=H)), TEXT),
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(**VISION)), PIXELS),
    "t5-large": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=99, d_model=H, d_kv=8, d_ff=37, num_layers=2, num_heads=4)), SEQ2SEQ),
    "blenderbot": (lambda: tf.BlenderbotForConditionalGeneration(tf.BlenderbotConfig(**SEQ)), SEQ2SEQ),
    "deberta-v2-xlarge": (lambda: tf.DebertaV2ForMaskedLM(tf.DebertaV2Config(vocab_size=99, hidden_size=H, num_hidden_layers=2,
                                                                            num_attention_heads=2, intermediate_size=37)), TEXT),
    "long-t5": (lambda: tf.LongT5ForConditionalGeneration(tf.LongT5Config(vocab_size=99, d_model=H, d_kv=8, d_ff=37, num_layers=2,
                                                                          num_heads=4, encoder_attention_type="transient-global")), SEQ2SEQ),
    "beit": (lambda: tf.BeitForImageClassification(tf.BeitConfig(**VISION)), PIXELS),
    "gpt-j": (lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=99, n_embd=H, n_layer=28, n_head=2, rotary_dim=8, n_positions=64)), TEXT),
    "roberta-large": (lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(vocab_size=99, hidden_size=H, num_hidden_layers=2,
                                                                      num_attention_heads=2, intermediate_size=37)), TEXT),
    "xlm-roberta-large": (lambda: tf.XLMRobertaForMaskedLM(tf.XLMRobertaConfig(vocab_size=99, hidden_size=H, num_hidden_layers=2,
                                                                                num_attention_heads=2, intermediate_size=37)), TEXT),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_embd=H, n_layer=2, n_head=2, n_positions=64)), TEXT),
    "bert-large-cased": (lambda: tf.BertForMaskedLM(tf.BertConfig(vocab_size=99, hidden_size=H, num_hidden_layers=2,
                                                                   num_attention_heads=2, intermediate_size=37)), TEXT),
    "bart": (lambda: tf.BartForConditionalGeneration(tf.BartConfig(**SEQ)), SEQ2SEQ),
}


@dataclass
class DeltaArguments:
    """The fields of the script's DeltaArguments (utils/args.py), merged with the method's own arguments."""

    delta_type: str = ""
    backbone_model: Optional[str] = ""
    model_path_public: Optional[str] = ""
    modified_modules: Optional[List[str]] = None
    unfrozen_modules: Optional[List[str]] = None
    finetuned_delta_path: Optional[str] = None
    force_download: Optional[bool] = False
    local_files_only: Optional[bool] = False
    delta_cache_dir: Optional[str] = None
    delay_push: Optional[bool] = True
    method_args: dict = field(default_factory=dict)


def delta_arguments(values: dict) -> dict:
    own = {k: v for k, v in values.items() if k in DeltaArguments.__dataclass_fields__}
    args = asdict(DeltaArguments(**own))
    del args["method_args"]
    args.update({k: v for k, v in values.items() if k not in own})  # the script's merge_arguments
    return args


@pytest.mark.parametrize("name", list(CONFIGS))
def test_run_py_opendelta_section(name, tmp_path, recwarn):
    values = CONFIGS[name]
    build, inputs = MODELS[values.get("backbone_model") or "clip"]
    torch.manual_seed(0)
    model = build().eval()
    bare = outputs(model, inputs)
    delta_args = DeltaArguments  # noqa: F841 - the script's names below
    args = delta_arguments(values)
    args["finetuned_delta_path"] = str(tmp_path / "delta")

    from bigmodelvis import Visualization

    Visualization(model).structure_graph()
    if args["delta_type"].lower() != "none":
        from opendelta import AutoDeltaConfig, AutoDeltaModel

        delta_config = AutoDeltaConfig.from_dict(args)
        delta_model = AutoDeltaModel.from_config(delta_config, backbone_model=model)
        delta_model.freeze_module(set_state_dict=True)
        delta_model.log(delta_ratio=True, trainable_ratio=True, visualization=True)

    train_a_little(model, inputs, steps=1)
    tuned = outputs(model, inputs)
    delta_model.save_finetuned(finetuned_delta_path=args["finetuned_delta_path"],
                               push_to_dc=False,
                               center_args={"test_performance": 0.5},
                               center_args_pool={**args},
                               list_tags=['NLI'],
                               dict_tags={'purpose': 'for testing'},
                               delay_push=True,
                               test_result={"test_average_metrics": 0.5})

    assert all(n.startswith("backbone.") is False for n in delta_model.trainable_parameters_names())
    assert any(issubclass(w.category, OriginalBehaviourWarning) for w in recwarn)  # script-only keys were dropped
    torch.manual_seed(0)
    fresh = build().eval()
    AutoDeltaModel.from_finetuned(args["finetuned_delta_path"], backbone_model=fresh)
    assert all(torch.equal(a, b) for a, b in zip(outputs(fresh, inputs), tuned))
    delta_model.detach()
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, inputs), bare))
