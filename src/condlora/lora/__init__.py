"""Conditioned LoRA: layers, conditioning strategies (TimeLoRA, ClassLoRA, UC-LoRA) and injection."""

from condlora.conditions import NULL_LABEL, Conditions
from condlora.lora.files import export_peft, load_lora, read_lora, save_lora
from condlora.lora.grouping import StackCache
from condlora.lora.inject import (
    LoRALayers,
    bind_conditions,
    conditioned_layers,
    inject_conditioned_lora,
    inject_lora,
    keep_stacks,
    lora_state_dict,
    merge_lora,
    rebinding_checkpoint,
    unmerge_lora,
)
from condlora.lora.layer import ConditionedLoRA
from condlora.lora.spec import LoRASpec
from condlora.lora.strategies import (
    UCMLP,
    ClassSelect,
    ClassTable,
    PlainLoRA,
    TimeTable,
    basis_timesteps,
    linear_interpolation_table,
    onehot_table,
)

__all__ = [
    "UCMLP",
    "ClassSelect",
    "ClassTable",
    "ConditionedLoRA",
    "LoRALayers",
    "LoRASpec",
    "NULL_LABEL",
    "Conditions",
    "PlainLoRA",
    "StackCache",
    "TimeTable",
    "basis_timesteps",
    "bind_conditions",
    "conditioned_layers",
    "export_peft",
    "inject_conditioned_lora",
    "inject_lora",
    "keep_stacks",
    "linear_interpolation_table",
    "load_lora",
    "lora_state_dict",
    "merge_lora",
    "onehot_table",
    "read_lora",
    "rebinding_checkpoint",
    "save_lora",
    "unmerge_lora",
]
