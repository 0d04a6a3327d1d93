"""The original OpenDelta's import paths resolve to opendelta's own objects (aliases, no second implementation)."""

import importlib

import pytest

import bigmodelvis
import opendelta
from opendelta import methods


def test_top_level_names_of_the_original_are_importable():
    from opendelta import BaseDeltaConfig, CommonStructureMap, SaveLoadMixin, Visualization

    assert Visualization is bigmodelvis.Visualization
    assert BaseDeltaConfig is opendelta.DeltaConfig
    assert issubclass(opendelta.DeltaBase, SaveLoadMixin)
    assert CommonStructureMap.__module__ == "opendelta.utils.structure_mapping"


@pytest.mark.parametrize("module, prefix", [
    ("lora", "Lora"), ("adapter", "Adapter"), ("bitfit", "BitFit"), ("compacter", "Compacter"),
    ("prefix", "Prefix"), ("soft_prompt", "SoftPrompt"), ("low_rank_adapter", "LowRankAdapter"),
    ("parallel_adapter", "ParallelAdapter"),
])
def test_delta_models_module_paths_alias_the_methods(module, prefix):
    aliased = importlib.import_module(f"opendelta.delta_models.{module}")
    assert getattr(aliased, f"{prefix}Config") is getattr(methods, f"{prefix}Config")
    assert getattr(aliased, f"{prefix}Model") is getattr(methods, f"{prefix}Model")


def test_module_paths_of_base_config_auto_and_utils():
    from opendelta.auto_delta import AutoDeltaConfig, AutoDeltaModel
    from opendelta.basemodel import DeltaBase
    from opendelta.delta_configs import BaseDeltaConfig
    from opendelta.utils.inspect import inspect_module_statistics, inspect_optimizer_statistics  # noqa: F401
    from opendelta.utils.model_md5 import gen_model_hash  # noqa: F401
    from opendelta.utils.name_based_addressing import endswith_in
    from opendelta.utils.saving_loading_utils import SaveLoadMixin  # noqa: F401
    from opendelta.utils.signature import get_arg_names
    from opendelta.utils.structure_mapping import CommonStructureMap  # noqa: F401

    assert (AutoDeltaConfig, AutoDeltaModel, DeltaBase, BaseDeltaConfig) == (
        opendelta.AutoDeltaConfig, opendelta.AutoDeltaModel, opendelta.DeltaBase, opendelta.DeltaConfig)
    assert endswith_in("encoder.layer.0.attention.self.query", ["query"])
    assert not endswith_in("encoder.layer.0.attention.self.query", ["uery"])
    assert get_arg_names(opendelta.LoraModel.__init__)[:2] == ["backbone_model", "modified_modules"]


def test_structure_graph_takes_the_original_keywords(capsys):
    from compat_models import bert

    from opendelta import Visualization

    tree = Visualization(bert()).structure_graph(rootname="bert", expand_params=True, keep_non_params=True,
                                                 common_structure=True, mapping=None, only_common=True, printTree=False)
    assert capsys.readouterr().out == ""
    from rich.console import Console

    console = Console(width=200, record=True, color_system=None)
    console.print(tree)
    text = console.export_text()
    assert text.startswith("bert (BertModel)") and "@attn.q" in text and "weight:[32,32]" in text
    assert "pooler" not in text  # only_common: modules without a role (and no role below) are left out
