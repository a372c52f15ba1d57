"""The report of a fine-tuning study (`condlora.study.adapt`): the arms' table and verdicts (TimeStep Master
against vanilla LoRA and full fine-tuning) and the guidance table (AutoLoRA against plain LoRA, the AutoLoRA
paper's Table 1), mean +- std over seeds, written from evals.json at any time, also for a partial study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from condlora.study.adapt import AdaptSpec, _run_dir, entry_name, guidance_entries
from condlora.study.report import COMMAND_FILE, _fmt, _stats, _train_minutes, compare
from condlora.train.checkpoint import write_json_atomic

METRICS = ("fid_in_domain", "precision", "recall", "diversity", "accuracy", "div_x", "parameters")


def _better(metric: str) -> str:
    """Which direction of `metric` is better: a distance is better lower, every other metric higher."""
    return "lower" if metric == "fid_in_domain" else "higher"


ARM_TITLES = {
    "base": "base (the source, not fine-tuned)",
    "lora": "vanilla LoRA",
    "tsm1": "TSM 1-stage (fostering)",
    "tsm2": "TSM 2-stage (fostering + assembling)",
    "full": "full fine-tuning",
}


def _source_line(source: Path) -> list[str]:
    """What the source run is, from its config.json (nothing when the source is a single checkpoint)."""
    config = source / "config.json"
    if not config.is_file():
        return []
    c = json.loads(config.read_text())
    m, t = c["model"], c["train"]
    return [
        f"Source: a {m['backbone']} network with {m['conditioning']} conditioning, trained {t['steps']} steps at "
        f"batch {t['batch_size']} on {c['data']['dataset']} (preset `{c.get('preset', '?')}`; its config.json "
        "holds every setting).",
        "",
    ]


def summarize(spec: AdaptSpec, evals: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per entry: the seeds evaluated and mean / std / n of each metric over them."""
    out = {}
    for entry, by_seed in evals.items():
        rows = [by_seed[str(s)] for s in spec.seeds if str(s) in by_seed]
        out[entry] = {"seeds": len(rows), "stats": {k: _stats([r[k] for r in rows]) for k in METRICS if k in rows[0]}}
    return out


def _train_time(spec: AdaptSpec, study_dir: Path, arm: str) -> str:
    """Mean training minutes over seeds of an arm (its runs summed)."""
    if arm == "base":
        return "-"
    runs = {"tsm2": ("tsm2-foster", "tsm2")}.get(arm, (arm,))
    minutes = [sum(_train_minutes(_run_dir(study_dir, r, s)) for r in runs) for s in spec.seeds]
    done = [m for m in minutes if m == m]
    return f"{sum(done) / len(done):.1f}" if done else "-"


def _verdicts(results: dict[str, dict[str, Any]], pairs: list[tuple[str, str, str, str]]) -> list[str]:
    """`claim: verdict` lines for (claim, a, b, metric): a lower than b in FID, or higher in the others."""
    lines = []
    for claim, a, b, metric in pairs:
        if a in results and b in results and metric in results[a]["stats"]:
            sa, sb = results[a]["stats"][metric], results[b]["stats"][metric]
            verdict = compare(sa, sb, f"{metric} {_better(metric)}", _better(metric))
            lines.append(f"- {claim}: **{verdict}**")
    return lines


def write_adapt_report(spec: AdaptSpec, study_dir: str | Path) -> Path:
    """Write <dir>/report/{report.md, results.json}; returns report.md."""
    study_dir = Path(study_dir)
    out = study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    evals_path = study_dir / "evals.json"
    evals = json.loads(evals_path.read_text()) if evals_path.is_file() else {}
    results = summarize(spec, evals)
    write_json_atomic(out / "results.json", {"spec": spec.to_dict(), "results": results})
    command = (study_dir / COMMAND_FILE).read_text().strip() if (study_dir / COMMAND_FILE).is_file() else ""
    n = spec.steps * spec.batch_size
    lines = [
        f"# Fine-tuning study: {spec.source} -> {spec.target}, {spec.shots} images per class",
        "",
        f"Regenerate: `{command}`" if command else "",
        "",
        *_source_line(Path(spec.source)),
        f"Every arm trains {spec.steps} optimizer steps at batch {spec.batch_size} ({n:,} images drawn from the "
        f"{10 * spec.shots} target images), seeds {', '.join(map(str, spec.seeds))}; LoRA rank {spec.rank}, lr "
        f"{spec.lr:g} (full fine-tuning {spec.full_lr:g}), EMA {spec.ema_decay}. TSM 1-stage fosters "
        f"{spec.tsm_scale} experts (each on its interval of the timesteps) for all {spec.steps} steps and samples "
        f"with them; TSM 2-stage fosters scales 1 and {spec.tsm_scale} for {spec.steps - spec.assemble_steps} "
        f"steps (half the samples to each scale), then trains only the routers for {spec.assemble_steps}. "
        f"Evaluation: {spec.eval_count} DDIM samples ({spec.eval_steps} steps, classes cycled, the same seeds for "
        f"every arm), guidance {spec.guidance_scale:g}, EMA weights, scored against {spec.target}'s training split "
        "in the MNIST reference classifier's feature space (in-domain FID, not comparable with published FID); "
        "accuracy is the share the classifier labels as the class asked for (class adherence); diversity is 1 - "
        "the mean pairwise cosine similarity of the classifier's features within a class; Div-X = diversity x "
        "accuracy.",
        "",
    ]
    total = (1 + len(spec.arms) + (1 + len(guidance_entries(spec)) if spec.gammas else 0)) * len(spec.seeds)
    done = sum(r["seeds"] for r in results.values())
    if done < total:
        lines += [f"**Partial: {done} of {total} evaluations finished.**", ""]
    base_params = results.get("base", {}).get("stats", {}).get("parameters", {}).get("mean")
    head = ["arm", "FID (target)", "precision", "recall", "diversity", "accuracy", "added parameters", "train min"]
    lines += ["## Domain adaptation: vanilla LoRA, TimeStep Master, full fine-tuning", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in ("base", *spec.arms):
        if arm not in results:
            continue
        st = results[arm]["stats"]
        added = "-" if base_params is None else f"{st['parameters']['mean'] - base_params:,.0f}"
        added = f"all {base_params:,.0f}" if arm == "full" and base_params else added
        row = [ARM_TITLES[arm], _fmt(st["fid_in_domain"]), _fmt(st["precision"]), _fmt(st["recall"])]
        row += [_fmt(st["diversity"]), _fmt(st["accuracy"], pct=True), added, _train_time(spec, study_dir, arm)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Mean +- sample standard deviation over seeds. A difference counts when it exceeds two standard "
              "errors.", "", "Verdicts:", ""]  # fmt: skip
    lines += _verdicts(
        results,
        [
            ("TSM 1-stage beats vanilla LoRA (FID)", "tsm1", "lora", "fid_in_domain"),
            ("TSM 2-stage beats vanilla LoRA (FID)", "tsm2", "lora", "fid_in_domain"),
            ("TSM 2-stage beats TSM 1-stage (FID)", "tsm2", "tsm1", "fid_in_domain"),
            ("TSM 1-stage beats vanilla LoRA (accuracy)", "tsm1", "lora", "accuracy"),
            ("full fine-tuning beats vanilla LoRA (FID)", "full", "lora", "fid_in_domain"),
            ("vanilla LoRA adapts (FID below the base's)", "lora", "base", "fid_in_domain"),
        ],
    )
    if spec.gammas:
        lines += ["", *_guidance_section(spec, results, out)]
    arms = _grid_row([(ARM_TITLES[a], a) for a in ("base", *spec.arms)], out)
    if arms:
        lines += ["", f"## Samples of the arms (seed {spec.seeds[0]}, guidance {spec.guidance_scale:g})", "", *arms]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _sweep(spec: AdaptSpec) -> list[tuple[str, float, float | None, str]]:
    """(entry, alpha, gamma or None, tag) of every row of the guidance table (the base has alpha 0)."""
    rows = []
    for tag in ("nocfg", "cfg"):
        rows.append(("base-nocfg" if tag == "nocfg" else "base", 0.0, None, tag))
        for a in spec.lora_scales:
            rows.append((entry_name(a, None, tag), a, None, tag))
            rows += [(entry_name(a, g, tag), a, g, tag) for g in spec.gammas]
    return rows


def _grid_row(grids: list[tuple[str, str]], out: Path) -> list[str]:
    """A one-row Markdown table of the sample grids (title, entry) that exist in `out`."""
    shown = [(title, entry) for title, entry in grids if (out / f"{entry}.png").is_file()]
    if not shown:
        return []
    return ["| " + " | ".join(f"{t}<br>![{t}]({e}.png)" for t, e in shown) + " |", "|" + "---|" * len(shown)]


def _guidance_section(spec: AdaptSpec, results: dict[str, dict[str, Any]], out: Path) -> list[str]:
    lines = [
        "## AutoLoRA guidance of the vanilla LoRA (the AutoLoRA paper's Table 1 at MNIST scale)",
        "",
        "The LoRA model at scale alpha (plain), and AutoLoRA: eps = eps_base^w + gamma (eps_lora^w - eps_base^w), "
        f"base and LoRA from one network (LoRA scale 0 and alpha). With CFG: w = {spec.guidance_scale:g} on both "
        "terms; without: w = 1 (conditional predictions only). Base: the source model.",
        "",
    ]
    head = ["guidance", "model", "alpha", "gamma", "FID (target)", "diversity", "accuracy", "Div-X"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry, a, g, tag in _sweep(spec):
        if entry not in results:
            continue
        st = results[entry]["stats"]
        model = "base" if entry.startswith("base") else ("AutoLoRA" if g is not None else "LoRA")
        guidance = f"CFG {spec.guidance_scale:g}" if tag == "cfg" else "no CFG"
        row = [guidance, model, f"{a:g}", "-" if g is None else f"{g:g}"]
        row += [_fmt(st["fid_in_domain"]), _fmt(st["diversity"]), _fmt(st["accuracy"], pct=True), _fmt(st["div_x"])]
        lines.append("| " + " | ".join(row) + " |")
    for tag in ("nocfg", "cfg"):
        title = f"CFG {spec.guidance_scale:g}" if tag == "cfg" else "no CFG"
        grids = [("base", "base-nocfg" if tag == "nocfg" else "base"), ("LoRA alpha 1", entry_name(1.0, None, tag))]
        grids += [(f"AutoLoRA alpha 1, gamma {g:g}", entry_name(1.0, g, tag)) for g in spec.gammas]
        lines += ["", f"Samples, {title} (seed {spec.seeds[0]}):", "", *_grid_row(grids, out)]
    verdicts = [("target FID", "fid_in_domain"), ("diversity", "diversity"), ("accuracy", "accuracy")]
    verdicts += [("Div-X", "div_x")]
    head = ["guidance", "alpha", "gamma", *(f"{name} {_better(m)}" for name, m in verdicts)]
    lines += ["", "Verdicts, AutoLoRA against the plain LoRA at the same alpha and guidance: holds / does not hold "
              "(the opposite is significant) / inconclusive, with the difference AutoLoRA - LoRA:", ""]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tag in ("nocfg", "cfg"):
        for a in spec.lora_scales:
            for g in spec.gammas:
                auto, plain = entry_name(a, g, tag), entry_name(a, None, tag)
                if auto not in results or plain not in results:
                    continue
                row = [f"CFG {spec.guidance_scale:g}" if tag == "cfg" else "no CFG", f"{a:g}", f"{g:g}"]
                for _, m in verdicts:
                    sa, sb = results[auto]["stats"][m], results[plain]["stats"][m]
                    verdict = compare(sa, sb, m, _better(m))
                    row.append(f"{verdict.split(' (')[0]} ({sa['mean'] - sb['mean']:+.3f})")
                lines.append("| " + " | ".join(row) + " |")
    return lines
