"""The report of a study: a Markdown page with a table of mean +- std over seeds, FID-vs-steps curves, the
papers' claims checked against the numbers, and the figures of each configuration's first seed; plus
results.json with every number it shows. Written from the files the runs leave, so it can be rewritten at
any time (`condlora study DIR --report-only`), also from a partial study."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from condlora.study.runner import FIRST_CLASSES, _read_json, run_dir_of
from condlora.study.spec import StudySpec
from condlora.train.checkpoint import write_json_atomic

COMMAND_FILE = "command.txt"


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def collect(spec: StudySpec, study_dir: Path) -> dict[str, dict[str, Any]]:
    """Per configuration: the finished seeds' curves (FID at each evaluated step) and statistics over seeds
    of the best FID over checkpoints (as the papers report), the final checkpoint's metrics, the class
    extrapolation FIDs and the omega locality."""
    out: dict[str, dict[str, Any]] = {}
    for c in spec.configs:
        seeds, curves, per_seed = [], {}, []
        for seed in spec.seeds:
            run_dir = run_dir_of(spec, study_dir, c.name, seed)
            evals, final = _read_json(run_dir / "eval.json"), _read_json(run_dir / "final.json")
            if not final:
                continue
            steps = sorted(int(s) for s in evals)
            fids = [evals[str(s)]["fid_in_domain"] for s in steps]
            last = evals[str(steps[-1])]
            row = {k: last[k] for k in ("fid_in_domain", "accuracy", "precision", "recall", "diversity")}
            row.update(best_fid=min(fids), best_step=steps[int(np.argmin(fids))], parameters=final["parameters"])
            for beta, m in final["extrapolation"].items():
                row[f"extrapolation_fid_{beta}"] = m["fid_in_domain"]
                row[f"extrapolation_accuracy_{beta}"] = m["accuracy"]
            for key in ("omega_locality", "omega_locality_init", "omega_locality_uniform"):
                if key in final:
                    row[key] = final[key]
            row["train_minutes"] = _train_minutes(run_dir)
            seeds.append(seed)
            curves[seed] = dict(zip(steps, fids, strict=True))
            per_seed.append(row)
        if not per_seed:
            continue
        keys = [k for k in per_seed[0] if all(k in r for r in per_seed)]
        out[c.name] = {
            "mode": c.mode,
            "omega": c.omega,
            "seeds": seeds,
            "curves": curves,
            "per_seed": per_seed,
            "stats": {k: _stats([r[k] for r in per_seed]) for k in keys},
        }
    return out


def _train_minutes(run_dir: Path) -> float:
    """Training wall time from the last row of metrics.csv (elapsed_s), in minutes."""
    lines = (run_dir / "metrics.csv").read_text().strip().splitlines() if (run_dir / "metrics.csv").is_file() else []
    if len(lines) < 2:
        return float("nan")
    header, last = lines[0].split(","), lines[-1].split(",")
    return float(last[header.index("elapsed_s")]) / 60


def compare(a: dict[str, float], b: dict[str, float], lower_is: str, better: str = "lower") -> str:
    """Verdict on mean(a) < mean(b) (or > with `better` "higher") from their spread: the difference
    mean(a) - mean(b) against two standard errors (sqrt(s_a^2 / n_a + s_b^2 / n_b)); `lower_is` names what
    the claimed direction means."""
    diff = a["mean"] - b["mean"]
    gain = -diff if better == "lower" else diff  # > 0 where a is better
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    if a["n"] < 2 or b["n"] < 2:
        return f"inconclusive (one seed; difference {diff:+.4f})"
    if gain > 2 * se:
        return f"holds ({lower_is}: {diff:+.4f}, 2 standard errors {2 * se:.4f})"
    if gain < -2 * se:
        return f"does not hold (the opposite is significant: {diff:+.4f}, 2 standard errors {2 * se:.4f})"
    return f"inconclusive (difference {diff:+.4f} within 2 standard errors {2 * se:.4f})"


def _by_mode(results: dict[str, dict[str, Any]], mode: str) -> list[str]:
    return [name for name, r in results.items() if r["mode"] == mode]


def claims(results: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """The papers' claims that the grid can test, each with a verdict computed from the numbers."""
    out: list[tuple[str, str]] = []
    fid = {name: r["stats"]["best_fid"] for name, r in results.items()}
    params = {name: r["stats"]["parameters"]["mean"] for name, r in results.items()}
    for base in _by_mode(results, "baseline"):
        for lora in _by_mode(results, "with_lora"):
            out.append((f"with_lora <= baseline FID ({lora} vs {base})", compare(fid[lora], fid[base], "lower FID")))
        for only in _by_mode(results, "lora_only"):
            verdict = compare(fid[only], fid[base], "lower FID")
            if verdict.startswith("inconclusive (difference"):  # seeds agree there is no clear difference
                verdict = "holds, no significant difference: " + verdict.removeprefix("inconclusive ")
            out.append((f"lora_only FID comparable to baseline or better ({only} vs {base})", verdict))
            fewer = params[only] < params[base]
            out.append(
                (
                    f"lora_only has fewer parameters than baseline ({only} vs {base})",
                    f"{'holds' if fewer else 'does not hold'}: {params[only]:,.0f} vs {params[base]:,.0f}",
                )
            )
            for key in sorted(k for k in results[only]["stats"] if k.startswith("extrapolation_fid_")):
                if key in results[base]["stats"]:
                    beta = key.rsplit("_", 1)[1]
                    verdict = compare(results[only]["stats"][key], results[base]["stats"][key], "lower FID")
                    out.append(
                        (f"ClassLoRA more robust than scale-and-shift at beta = {beta} ({only} vs {base})", verdict)
                    )
    for adaln in _by_mode(results, "adaln_attn"):
        for lora in _by_mode(results, "with_lora"):
            verdict = compare(fid[lora], fid[adaln], "lower FID")
            out.append((f"LoRA better than adaLN on attention ({lora} vs {adaln})", verdict))
    for name, r in results.items():
        s = r["stats"]
        if r["omega"].startswith("train") and "omega_locality" in s:
            loc, uniform = s["omega_locality"], s["omega_locality_uniform"]["mean"]
            init = s.get("omega_locality_init", {}).get("mean", float("nan"))
            verdict = "holds" if loc["mean"] - 2 * loc["std"] > uniform else "does not hold"
            out.append(
                (
                    f"trained omega puts its weight on nearby bases ({name})",
                    f"{verdict}: {loc['mean']:.3f} +- {loc['std']:.3f} of |omega| on the 2 nearest bases "
                    f"(even spread {uniform:.3f}; at initialisation {init:.3f})",
                )
            )
    return out


def _fmt(s: dict[str, float] | None, digits: int = 3, pct: bool = False) -> str:
    if s is None:
        return "-"
    if pct:
        return f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f}%"
    return f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f}"


def plot_curves(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """FID over training steps: the mean over seeds per configuration, shaded between the lowest and highest
    seed."""
    from condlora.eval.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        steps = sorted(set.intersection(*(set(c) for c in r["curves"].values())))
        values = np.array([[c[s] for s in steps] for c in r["curves"].values()])
        line = ax.plot(steps, values.mean(0), marker="o", ms=3, label=f"{name} ({len(values)} seeds)")[0]
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax.set(xlabel="training step", ylabel="in-domain FID (lower is better)", yscale="log")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_report(spec: StudySpec, study_dir: str | Path) -> Path:
    """Write <study>/report/{report.md, results.json, fid-vs-steps.png, figures}; returns report.md."""
    study_dir = Path(study_dir)
    out = study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    results = collect(spec, study_dir)
    write_json_atomic(out / "results.json", {"spec": spec.to_dict(), "results": results})
    command = (study_dir / COMMAND_FILE).read_text().strip() if (study_dir / COMMAND_FILE).is_file() else ""
    cfg = spec.run_config(spec.configs[0].name, spec.seeds[0], Path("run"))
    t, s = cfg.train, cfg.sample
    lines = [
        f"# Study: {spec.preset}, {len(spec.configs)} configurations x {len(spec.seeds)} seeds",
        "",
        f"Regenerate: `{command}`" if command else "",
        "",
        f"Budget: {t.steps} steps at batch {t.batch_size} ({t.steps * t.batch_size:,} images) per run, seeds "
        f"{', '.join(map(str, spec.seeds))}. Every {spec.eval_every} steps: {spec.eval_count} samples (classes "
        f"cycled), {s.sampler} sampler, {s.steps} steps, guidance {s.guidance_scale}, EMA weights. FID is "
        "in-domain (the MNIST reference classifier's features; not comparable with published FID); best FID "
        "is the lowest over the evaluated checkpoints, as the papers report. Class extrapolation: "
        f"{spec.extrapolation_count} samples with class vector beta * c for beta in "
        f"{', '.join(f'{b:g}' for b in spec.extrapolation)}.",
        "",
    ]
    done = sum(len(r["seeds"]) for r in results.values())
    if done < len(spec.runs()):
        lines += [f"**Partial: {done} of {len(spec.runs())} runs finished.**", ""]
    betas = [f"{b}" for b in map(float, spec.extrapolation)]
    head = ["configuration", "parameters", "best FID", "final FID", "accuracy", "precision", "recall", "diversity"]
    head += [f"FID at beta={b}" for b in betas] + ["omega locality", "train min"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        st = r["stats"]
        row = [name, f"{st['parameters']['mean']:,.0f}", _fmt(st["best_fid"]), _fmt(st["fid_in_domain"])]
        row += [_fmt(st["accuracy"], pct=True), _fmt(st["precision"], 3), _fmt(st["recall"], 3)]
        row += [_fmt(st["diversity"], 3)] + [_fmt(st.get(f"extrapolation_fid_{b}")) for b in betas]
        row += [_fmt(st.get("omega_locality"), 3), f"{st['train_minutes']['mean']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Mean +- sample standard deviation over seeds.", ""]
    if results:
        plot_curves(results, out / "fid-vs-steps.png")
        lines += ["## FID over training", "", "![FID vs steps](fid-vs-steps.png)", ""]
    lines += ["## The papers' claims at this scale", ""]
    lines += [f"- {claim}: **{verdict}**" for claim, verdict in claims(results)] + [""]
    lines += _figures(spec, study_dir, results, out)
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _figures(spec: StudySpec, study_dir: Path, results: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """Copy the first seed's figures of each configuration into the report and list them."""
    first, second = FIRST_CLASSES
    kinds = [("samples", None), ("omega heat map", "omega.png")]
    kinds += [(f"beta = {b:g}", f"extrapolation-beta{b:g}.png") for b in spec.extrapolation]
    kinds += [
        (f"class {first} -> {second} interpolation", f"class-interpolation-{first}-{second}.png"),
        (f"class {first} extrapolation, beta -1 .. 1", f"class-extrapolation-{first}-{second}.png"),
    ]
    lines = ["## Figures (first seed, final checkpoint)", ""]
    for name, r in results.items():
        run_dir = run_dir_of(spec, study_dir, name, r["seeds"][0])
        step = max(r["curves"][r["seeds"][0]])
        shown = []
        for label, file in kinds:
            src = run_dir / "figures" / (file or f"samples-step{step}.png")
            if src.is_file():
                dst = out / f"{name}-{src.name}"
                shutil.copyfile(src, dst)
                shown.append(f"{label}<br>![{label}]({dst.name})")
        if shown:
            lines += [f"### {name}", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown), ""]
    return lines
