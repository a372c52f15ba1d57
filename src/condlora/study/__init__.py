"""Studies: grids of configurations x seeds at one training budget, evaluated and reported (`condlora study`)."""

from condlora.study.report import claims, collect, compare, write_report
from condlora.study.runner import evaluate_checkpoints, omega_locality, probe_final, run_one, run_study
from condlora.study.spec import LORA_MODES, MODES, OMEGA_TYPES, StudyConfig, StudySpec, grid

__all__ = [
    "LORA_MODES",
    "MODES",
    "OMEGA_TYPES",
    "StudyConfig",
    "StudySpec",
    "claims",
    "collect",
    "compare",
    "evaluate_checkpoints",
    "grid",
    "omega_locality",
    "probe_final",
    "run_one",
    "run_study",
    "write_report",
]
