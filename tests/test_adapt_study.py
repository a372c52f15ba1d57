"""condlora adapt-study: the fine-tuning arms on a tiny pretrained model, the guidance sweep, the report, the
resume and the refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from condlora.cli import main
from condlora.config import ConfigError
from condlora.study.adapt import AdaptSpec, entry_name, guidance_entries
from condlora.train.checkpoint import list_checkpoints

TINY = ["--nano.channels", "8", "--nano.channel_mult", "1,2", "--nano.attn_levels", "1", "--nano.num_heads", "2"]
TINY += [
    "--ddpm.num_timesteps",
    "40",
    "--sample.steps",
    "10",
    "--train.batch_size",
    "8",
    "--train.device",
    "cpu",
    "--train.progress",
    "false",
]


@pytest.fixture
def source(tmp_path):
    out = tmp_path / "base"
    args = [*TINY, "--train.steps", "2", "--train.progress", "false", "--train.out_dir", str(out), "--no-sample"]
    assert main(["train", "--preset", "mnist-nano-baseline", *args]) == 0
    return out


def _args(study, source) -> list[str]:
    args = ["adapt-study", str(study), "--source", str(source), "--steps", "6", "--batch-size", "8", "--seeds", "0"]
    return args + ["--eval-count", "20", "--eval-steps", "2", "--lora-scales", "0.5", "--gammas", "2", "--no-progress"]


def _weights(run, kind: str = "model") -> dict[str, torch.Tensor]:
    """The last checkpoint's raw ("model") or averaged ("ema") weights."""
    return load_file(str(list_checkpoints(run / "checkpoints")[-1] / f"{kind}.safetensors"))


def _without_time(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "sampling_seconds"}


def test_adapt_study_trains_every_arm_sweeps_guidance_reports_and_resumes(tmp_path, source, small_classifier):
    study = tmp_path / "study"
    assert main(_args(study, source)) == 0
    evals = json.loads((study / "evals.json").read_text())
    sweep = ["base-nocfg", "lora-a0.5-nocfg", "autolora-a0.5-g2-nocfg", "lora-a0.5-cfg", "autolora-a0.5-g2-cfg"]
    assert set(evals) == {"base", "lora", "tsm1", "tsm2", "full", *sweep}
    assert all(set(by_seed) == {"0"} for by_seed in evals.values())

    # The arms are what they claim: LoRA and experts only beside the frozen base, the assembling stage adds
    # routers and leaves the fostered experts (the EMA it starts from) alone, full fine-tuning changes the
    # base's own weights.
    runs = study / "runs"
    assert all("lora_" in k for k in _weights(runs / "lora-seed0"))
    foster, assembled = _weights(runs / "tsm2-foster-seed0", "ema"), _weights(runs / "tsm2-seed0")
    assert set(assembled) - set(foster) and all("strategies.tsm" in k for k in set(assembled) - set(foster))
    assert all(torch.equal(foster[k], assembled[k]) for k in foster)
    assert all("strategies.tsm" in k for k in _weights(runs / "tsm2-seed0", "ema"))  # only the routers average
    base, full = _weights(source), _weights(runs / "full-seed0")
    assert set(base) == set(full) and any(not torch.equal(base[k], full[k]) for k in base)
    added = {arm: evals[arm]["0"]["parameters"] - evals["base"]["0"]["parameters"] for arm in ("lora", "tsm1", "tsm2")}
    assert added["lora"] > 0 and added["tsm1"] == 4 * added["lora"]  # 4 experts of the LoRA's rank and layers
    assert added["tsm2"] > 5 * added["lora"]  # scales 1 and 4, plus the routers
    assert evals["full"]["0"]["parameters"] == evals["base"]["0"]["parameters"]

    report = (study / "report" / "report.md").read_text()
    for title in ("vanilla LoRA", "TSM 1-stage", "TSM 2-stage", "full fine-tuning", "AutoLoRA"):
        assert title in report
    assert "Partial" not in report and (study / "report" / "tsm2.png").is_file()
    assert report.count("| AutoLoRA | 0.5 | 2 |") == 2  # with and without CFG

    # Resume: a lost evaluation is redone (the same numbers: same seeds), nothing trains again.
    files = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    lost = evals.pop("tsm1")
    (study / "evals.json").write_text(json.dumps(evals))
    assert main(["adapt-study", str(study), "--no-progress"]) == 0
    again = json.loads((study / "evals.json").read_text())
    assert set(again) == set(evals) | {"tsm1"} and _without_time(again["tsm1"]["0"]) == _without_time(lost["0"])
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == files
    assert main(["adapt-study", str(study), "--source", str(source), "--steps", "7"]) == 2  # another study


def test_adapt_study_refuses_what_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="tsm_scale"):
        AdaptSpec(source="x", tsm_scale=1)
    with pytest.raises(ConfigError, match="arms"):
        AdaptSpec(source="x", arms=("lora", "moe"))
    with pytest.raises(ConfigError, match="gammas"):
        AdaptSpec(source="x", arms=("tsm1",))  # the sweep guides the LoRA arm
    with pytest.raises(ConfigError, match="assemble_share"):
        AdaptSpec(source="x", steps=2, assemble_share=0.2)
    assert main(["adapt-study", str(tmp_path / "new")]) == 2  # no --source
    assert main(["adapt-study", str(tmp_path / "new"), "--source", str(tmp_path / "missing")]) != 0


def test_guidance_sweep_covers_the_table_once():
    spec = AdaptSpec(source="x", lora_scales=(0.5, 1.0), gammas=(1.5, 2.0))
    entries = guidance_entries(spec)
    # 2 alphas x (plain + 2 gammas) x (CFG, no CFG), less plain LoRA at alpha 1 with CFG (the lora arm itself)
    assert len(entries) == 2 * 3 * 2 - 1 and entry_name(1.0, None, "cfg") == "lora" not in entries
    assert entries["autolora-a0.5-g2-nocfg"] == {
        "guidance": "autolora", "guidance_scale": 1.0, "lora_scale": 0.5, "autolora_gamma": 2.0
    }  # fmt: skip
    assert entries["lora-a1-nocfg"] == {"guidance": "cfg", "guidance_scale": 1.0, "lora_scale": 1.0}
