"""condlora study: the grid, its checks, the statistics it reports, and a two-configuration study that is
interrupted mid-run and resumed."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from condlora.cli import main
from condlora.config import ConfigError
from condlora.eval.classifier import DigitClassifier
from condlora.lora import conditioned_layers
from condlora.lora.strategies import linear_interpolation_table, onehot_table
from condlora.nets import build_network
from condlora.study import StudySpec, compare, grid, omega_locality
from condlora.train.checkpoint import list_checkpoints

TINY = {
    "nano": {"channels": 8, "channel_mult": (1, 2), "attn_levels": (1,), "num_heads": 2},
    "ddpm": {"num_timesteps": 50},
    "sample": {"steps": 3},
    "train": {"steps": 8, "batch_size": 8, "warmup_steps": 1, "log_every": 2, "device": "cpu"},
}


def _spec(**kw) -> StudySpec:
    configs = grid("mnist-nano", ("baseline", "with_lora"), ("fixed",), TINY)
    base = dict(preset="mnist-nano", configs=configs, seeds=(0,), overrides=TINY, eval_every=4, eval_count=20)
    base.update(eval_sample={"sampler": "ddim", "steps": 3}, extrapolation=(-1.0,), extrapolation_count=20)
    return StudySpec(**{**base, **kw})


def test_grid_turns_lora_off_for_modes_without_it_and_expands_omega_types():
    configs = grid("mnist-nano", omegas=("fixed", "train", "train-gaussian"), overrides=TINY)
    assert [c.name for c in configs] == [
        "baseline",
        "with_lora-omega_fixed",
        "with_lora-omega_train",
        "with_lora-omega_train-gaussian",
        "lora_only-omega_fixed",
        "lora_only-omega_train",
        "lora_only-omega_train-gaussian",
        "adaln_attn",
    ]
    spec = StudySpec(preset="mnist-nano", configs=configs, overrides=TINY)
    for c in configs:
        cfg = spec.run_config(c.name, 1, Path("x"))
        assert cfg.model.conditioning == c.mode and cfg.train.seed == 1
        assert cfg.train.out_dir == "x" and cfg.train.checkpoint_every == spec.eval_every
        layers = list(conditioned_layers(build_network(cfg)))
        assert bool(layers) == (c.mode in ("with_lora", "lora_only")), c.name
        if c.omega:
            assert (cfg.lora.omega, cfg.lora.omega_init) == {
                "fixed": ("fixed", "linear"),
                "train": ("train", "linear"),
                "train-gaussian": ("train", "gaussian"),
            }[c.omega]
    kept = grid("mnist-nano", ("baseline", "with_lora"), ("fixed", "train"), TINY, skip=("with_lora-omega_train",))
    assert [c.name for c in kept] == ["baseline", "with_lora-omega_fixed"]


def test_grid_and_spec_refuse_what_cannot_run():
    with pytest.raises(ConfigError, match="unknown mode 'film'"):
        grid("mnist-nano", ("film",))
    with pytest.raises(ConfigError, match="unknown omega type 'learned'"):
        grid("mnist-nano", omegas=("learned",))
    with pytest.raises(ConfigError, match="needs LoRA banks, and preset mnist-nano-baseline has none"):
        grid("mnist-nano-baseline", ("with_lora",))
    with pytest.raises(ConfigError, match="--skip names no configuration"):
        grid("mnist-nano", ("baseline",), skip=("adaln",))
    with pytest.raises(ConfigError, match="28x28 grayscale with 10 classes"):
        StudySpec(preset="digits-nano", configs=grid("digits-nano", ("baseline",)))
    with pytest.raises(ConfigError, match="eval_count and extrapolation_count must be >= 20"):
        _spec(eval_count=10)
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        _spec(seeds=(1, 1))
    with pytest.raises(ConfigError, match="configuration baseline: .*batch_size"):
        _spec(overrides={**TINY, "train": {**TINY["train"], "batch_size": 0}})


def test_spec_round_trips_through_plain_data():
    spec = _spec()
    back = StudySpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back.to_dict() == spec.to_dict() and back.configs == spec.configs
    for c in spec.configs:
        assert back.run_config(c.name, 2, Path("r")) == spec.run_config(c.name, 2, Path("r"))


def test_omega_locality_closed_forms():
    T, bases = 100, 11
    assert omega_locality(linear_interpolation_table(T, bases)) == pytest.approx(1.0, abs=1e-12)
    assert omega_locality(onehot_table(T, bases)) == pytest.approx(1.0, abs=1e-12)
    assert omega_locality(torch.ones(T, bases)) == pytest.approx(2 / bases, abs=1e-12)
    far = torch.zeros(T, bases)
    far[:, 0], far[:, -1] = 1.0, 1.0  # the two end bases: near only at the ends
    # knots 1, 10.9, 20.8, ..., 100: basis 0 is among the two nearest for s = 1..10, basis 10 for s = 91..100,
    # each then holding half the mass: 20 steps x 0.5 / 100 steps
    assert omega_locality(far) == pytest.approx(0.1, abs=1e-12)


def test_compare_verdicts_from_spread():
    tight_low, tight_high = {"mean": 1.0, "std": 0.1, "n": 3}, {"mean": 2.0, "std": 0.1, "n": 3}
    assert compare(tight_low, tight_high, "lower FID").startswith("holds")
    assert compare(tight_high, tight_low, "lower FID").startswith("does not hold")
    wide = {"mean": 1.5, "std": 1.0, "n": 3}
    assert compare(wide, tight_high, "lower FID").startswith("inconclusive")
    assert compare({"mean": 0.1, "std": 0.0, "n": 1}, tight_high, "x").startswith("inconclusive (one seed")
    assert compare(tight_high, tight_low, "higher accuracy", better="higher") == (
        "holds (higher accuracy: +1.0000, 2 standard errors 0.1633)"  # 2 sqrt(0.1^2 / 3 * 2)
    )
    assert compare(tight_low, tight_high, "x", better="higher").startswith("does not hold")
    assert compare(wide, tight_high, "x", better="higher").startswith("inconclusive")


def _study_args(study_dir) -> list[str]:
    args = ["study", str(study_dir), "--modes", "baseline,with_lora", "--seeds", "0", "--eval-every", "4"]
    args += ["--eval-count", "20", "--eval-sampler", "ddim", "--eval-steps", "3", "--extrapolation", "-1"]
    args += ["--extrapolation-count", "20", "--no-progress"]
    for section, values in TINY.items():
        for name, value in values.items():
            args.append(f"--{section}.{name}={','.join(map(str, value)) if isinstance(value, tuple) else value}")
    return args


def _metrics(run_dir: Path) -> dict:
    """eval.json without its wall times."""
    evals = json.loads((run_dir / "eval.json").read_text())
    return {step: {k: v for k, v in m.items() if k != "sampling_seconds"} for step, m in evals.items()}


def test_study_resumes_after_an_interruption_without_redoing_finished_runs(tmp_path, monkeypatch, small_classifier):
    import condlora.train.loop as loop

    reference, study = tmp_path / "reference", tmp_path / "study"
    assert main(_study_args(reference)) == 0

    real_save, saves = loop._save, []

    def save_then_die(state, cfg, out_dir, dist):
        path = real_save(state, cfg, out_dir, dist)
        saves.append(out_dir.name)
        if out_dir.name == "with_lora-omega_fixed-seed0" and state.step == 4:
            raise KeyboardInterrupt  # killed right after the second run's first checkpoint
        return path

    monkeypatch.setattr(loop, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(_study_args(study))
    first, second = study / "runs" / "baseline-seed0", study / "runs" / "with_lora-omega_fixed-seed0"
    assert (first / "final.json").is_file() and not (second / "final.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}

    saves.clear()
    assert main(["study", str(study), "--no-progress"]) == 0  # resumes from study.json alone
    assert set(saves) == {"with_lora-omega_fixed-seed0"}  # only the unfinished run trained (steps 5-8)
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == finished
    for run in ("baseline-seed0", "with_lora-omega_fixed-seed0"):  # as if never interrupted
        got, want = study / "runs" / run, reference / "runs" / run
        assert _metrics(got) == _metrics(want)
        a, b = (load_file(str(list_checkpoints(d / "checkpoints")[-1] / "model.safetensors")) for d in (got, want))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    results = json.loads((study / "report" / "results.json").read_text())["results"]
    assert set(results) == {"baseline", "with_lora-omega_fixed"}
    assert sorted(results["baseline"]["curves"]["0"]) == ["4", "8"]
    assert results["with_lora-omega_fixed"]["stats"]["omega_locality"]["mean"] > 0.9
    report = (study / "report" / "report.md").read_text()
    assert "| baseline |" in report and "| with_lora-omega_fixed |" in report
    assert (study / "report" / "fid-vs-steps.png").is_file()
    assert (study / "report" / "with_lora-omega_fixed-omega.png").is_file()
    assert main(["study", str(tmp_path / "other"), "--modes", "bogus"]) == 2
    assert main(["study", str(study), "--seeds", "0,1"]) == 2  # another study in the same directory


def test_jobs_run_each_configuration_in_its_own_process(tmp_path, monkeypatch):
    """--jobs 2: both runs go to worker processes (`condlora study DIR --only CONFIG:SEED`), each logged."""
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    (cache / "condlora").mkdir(parents=True)
    torch.manual_seed(0)  # a stand-in classifier the workers find in their cache
    save_file(DigitClassifier().state_dict(), str(cache / "condlora" / "digit-classifier-v1.safetensors"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    study = tmp_path / "study"
    assert main([*_study_args(study), "--jobs", "2", "--threads", "1", "--train.steps=4"]) == 0
    for run in ("baseline-seed0", "with_lora-omega_fixed-seed0"):
        assert (study / "runs" / run / "final.json").is_file()
        assert "step 4: FID" in (study / "runs" / f"{run}.log").read_text()
    results = json.loads((study / "report" / "results.json").read_text())["results"]
    assert set(results) == {"baseline", "with_lora-omega_fixed"}


def test_a_study_killed_with_sigkill_resumes(tmp_path, monkeypatch):
    """SIGKILL the `condlora study` process once its second run has a checkpoint, then run it again: the
    first run is not redone and the second finishes from its checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    (cache / "condlora").mkdir(parents=True)
    torch.manual_seed(0)
    save_file(DigitClassifier().state_dict(), str(cache / "condlora" / "digit-classifier-v1.safetensors"))
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1"}
    study = tmp_path / "study"
    args = [*_study_args(study), "--train.steps=40", "--eval-every", "20", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "condlora.cli", *args], env=env, stdout=subprocess.DEVNULL)
    second = study / "runs" / "with_lora-omega_fixed-seed0" / "checkpoints"
    deadline = time.time() + 300
    while not list_checkpoints(second) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = study / "runs" / "baseline-seed0"
    assert (first / "final.json").is_file()
    assert not (second.parent / "final.json").exists(), "the study ended before the kill; nothing was tested"
    finished = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert main(["study", str(study), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == finished
    assert json.loads((second.parent / "final.json").read_text())["step"] == 40
    assert sorted(json.loads((second.parent / "eval.json").read_text()), key=int) == ["20", "40"]


def test_claims_are_judged_from_the_numbers():
    from condlora.study import claims

    def config(mode, omega, fid, params, beta_fid, locality=None):
        stats = {
            "best_fid": {"mean": fid[0], "std": fid[1], "n": 3},
            "parameters": {"mean": params, "std": 0.0, "n": 3},
            "extrapolation_fid_-1.0": {"mean": beta_fid, "std": 0.5, "n": 3},
        }
        if locality is not None:
            stats["omega_locality"] = {"mean": locality, "std": 0.01, "n": 3}
            stats["omega_locality_uniform"] = {"mean": 0.2, "std": 0.0, "n": 3}
            stats["omega_locality_init"] = {"mean": 1.0, "std": 0.0, "n": 3}
        return {"mode": mode, "omega": omega, "stats": stats}

    results = {
        "baseline": config("baseline", "", (5.0, 0.2), 100, 30.0),
        "with_lora-omega_train": config("with_lora", "train", (3.0, 0.2), 120, 20.0, locality=0.9),
        "lora_only": config("lora_only", "", (5.1, 0.2), 110, 3.0),
        "adaln_attn": config("adaln_attn", "", (2.0, 0.1), 90, 25.0),
    }
    verdicts = dict(claims(results))
    assert verdicts["with_lora <= baseline FID (with_lora-omega_train vs baseline)"].startswith("holds")
    assert verdicts["lora_only FID comparable to baseline or better (lora_only vs baseline)"].startswith(
        "holds, no significant difference"
    )
    assert (
        verdicts["lora_only has fewer parameters than baseline (lora_only vs baseline)"] == "does not hold: 110 vs 100"
    )
    robust = "ClassLoRA more robust than scale-and-shift at beta = -1.0 (lora_only vs baseline)"
    assert verdicts[robust].startswith("holds")
    adaln = "LoRA better than adaLN on attention (with_lora-omega_train vs adaln_attn)"
    assert verdicts[adaln].startswith("does not hold")
    assert verdicts["trained omega puts its weight on nearby bases (with_lora-omega_train)"].startswith("holds: 0.900")
