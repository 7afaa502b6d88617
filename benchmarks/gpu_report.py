"""Write the results of ``benchmarks/gpu_runs.py`` (its ``summary.json``) into BENCHMARKS.md.

    python benchmarks/gpu_report.py SUMMARY_JSON --device "one NVIDIA H200" --command "bash benchmarks/gpu_session.sh ..."
    python benchmarks/gpu_report.py CALL1/summary.json CALL2/summary.json --long --device ... --command C1 --command C2
    python benchmarks/gpu_report.py S5/summary.json --sweep --device ... --command C
    python benchmarks/gpu_report.py S7/summary.json --next S7_CALL2_DIR --device ... --command C1 --command C2
    python benchmarks/gpu_report.py S7/summary.json S9/summary.json --seeds S9_CALL2_DIR --device ... --command C1 --command C2
    python benchmarks/gpu_report.py S7/summary.json S9/summary.json S11/summary.json --layerwise S9_CALL2_DIR --device ... --command C
    python benchmarks/gpu_report.py S7/summary.json S9/summary.json S12/summary.json --layerwise S9_CALL2_DIR --final --device ... --command C
    python benchmarks/gpu_report.py S21/summary.json --gmp-levers --device ... --command C
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _report import ROOT, write_section


# Table headers: an SST-2 run (dev accuracy) and a SQuAD run (EM / F1), one row each from _row / _squad_row.
SST2_HEAD = ("| run | dev | Δ vs dense | encoder Linear sparsity | epochs | train wall time |\n"
             "|---|---|---|---|---|---|")
SQUAD_HEAD = ("| run | EM | F1 | Δ F1 vs (a) | encoder Linear sparsity | epochs | train wall time |\n"
              "|---|---|---|---|---|---|---|")


# The GMP 80% block4 students of issue 3 by seed (init_lr 4e-4, T 5.5, global, 9 epochs): logits KD only (session 7
# for seed 42, session 9 for 1-3), and the same with per-layer KD (sessions 11 and 12).
LOGITS_KD_BY_SEED = {42: "next-gmp-lr4e-4-t5.5-global", 1: "s9-gmp-seed1", 2: "s9-gmp-seed2", 3: "s9-gmp-seed3"}
LAYERWISE_BY_SEED = {seed: f"s10-gmp-layerwise-seed{seed}" for seed in LOGITS_KD_BY_SEED}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _stopped(m: dict, label: str) -> str:
    """``label``, marked when the run was stopped at the deadline (its metrics are mid-schedule), or when its
    metrics come from its training log (see :func:`finished_from_logs`)."""
    where = m.get("stopped_early")
    if m.get("from_train_log"):
        return f"{label} (final epoch-end eval from train_log.jsonl: killed before metrics.json)"
    return f"{label} (**stopped at epoch {where['epoch']:g}** of {m['epochs']:g})" if where else label


def _row(runs: dict, name: str, label: str, metric, ref: float | None = None) -> str:
    r = runs.get(name, {})
    m = r.get("metrics")
    if not m:
        return f"| {label} | {r.get('status', 'not run')} | | | | |"
    label = _stopped(m, label)
    v = metric(m["validation"])
    delta = "" if ref is None else f"{v - ref:+.2f}"
    sparsity = "not measured" if m["encoder_sparsity"] is None else f"{_pct(m['encoder_sparsity'])}%"
    return (f"| {label} | {v:.2f} | {delta} | {sparsity} | {m['epochs']:g} | "
            f"{m['train_wall_seconds'] / 60:.1f} min |")


def _ref(runs: dict, name: str, metric) -> float | None:
    """``metric`` of run ``name`` (the Δ reference of a table), ``None`` if it did not finish."""
    m = runs.get(name, {}).get("metrics")
    return metric(m["validation"]) if m else None


def _epoch_curve(work_logs: dict, name: str) -> str:
    curve = work_logs.get(name)
    return ", ".join(f"{100 * a:.2f}" for a in curve) if curve else "n/a"


def _squad_row(runs: dict, name: str, label: str, ref_name: str) -> str:
    """A SQuAD table row: EM, F1, Δ F1 vs run ``ref_name``, sparsity, epochs, train wall time."""
    m = runs.get(name, {}).get("metrics")
    if not m:
        return f"| {label} | {runs.get(name, {}).get('status', 'not run')} | | | | | |"
    v, ref = m["validation"], _ref(runs, ref_name, lambda v: v["f1"])
    label = _stopped(m, label)
    return (f"| {label} | {v['exact_match']:.2f} | {v['f1']:.2f} | {v['f1'] - ref:+.2f} | {_pct(m['encoder_sparsity'])}% "
            f"| {m['epochs']:g} | {m['train_wall_seconds'] / 60:.1f} min |")


def _commands(runs: dict, names: list[str]) -> str:
    lines = [runs[n]["cmd"].replace("/tmp/gpu_runs", "runs/gpu").replace("/tmp/dev/minilm", "$MINILM")
             for n in names if runs.get(n, {}).get("cmd")]
    return "```\n" + "\n".join(lines) + "\n```"


def report(summary: dict, curves: dict, device: str, command: str) -> None:
    """Write the GPU sections of BENCHMARKS.md (issues 3, 4, 5 and 8)."""
    runs = summary["runs"]
    acc = lambda v: 100 * v["accuracy"]  # noqa: E731
    where = (f"Device: {device}, all runs of `benchmarks/gpu_runs.py` side by side on it (wall times are "
             f"shared-GPU times). Reproduce: `{command}`. Pre-trained weights: the packaged all-MiniLM-L6-v2, "
             "carried to the GPU machine as FP16 and restored to FP32 (`benchmarks/gpu_carry.py`; `$MINILM` below).")
    ref = _ref(runs, "sst2-dense", acc)
    body = [where, "", "SST-2, full train set (67,349), full dev (872), seq 128, batch 32, seed 42. (b)/(c) start from (a) "
            "and distill from it (hardness 1.0, T 2), 2 epochs, cubic pruning from epoch 0 to `prune_end`.", "", SST2_HEAD,
            _row(runs, "sst2-dense", "(a) dense fine-tune", acc, ref),
            _row(runs, "sst2-gmp80-block4-kd", "(b) GMP 80% block4 + KD (prune over 1/2 of the run)", acc, ref),
            _row(runs, "sst2-gmp80-block4-kd-longprune", "(b2) GMP 80% block4 + KD (prune over 3/4 of the run)", acc, ref),
            _row(runs, "sst2-gmp90-unstructured-kd", "(c) GMP 90% unstructured + KD", acc, ref), "",
            "Dev accuracy at each epoch end: " + "; ".join(
                f"{n}: {_epoch_curve(curves, n)}" for n in ("sst2-gmp80-block4-kd", "sst2-gmp80-block4-kd-longprune",
                                                            "sst2-gmp90-unstructured-kd")), "",
            _commands(runs, ["sst2-dense", "sst2-gmp80-block4-kd", "sst2-gmp80-block4-kd-longprune", "sst2-gmp90-unstructured-kd"])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_sst2", "SST-2 main job on a GPU: full train set", "\n".join(body))

    rows = [_squad_row(runs, name, label, "squad-dense")
            for name, label in (("squad-dense", "(a) dense fine-tune"), ("squad-gmp80-block4-kd", "(b) GMP 80% block4 + KD"),
                                ("squad-gmp90-unstructured-kd", "(c) GMP 90% unstructured + KD"))]
    body = [where, "", "SQuAD v1.1: **training used dev articles** (no train-v1.1.json offline): dev-v1.1.json split by "
            "article, 36 for training and 12 held out (`--split-by-article 36:12`, seed 42; the split is saved as "
            "`article_split.json`); scores are on the 12 held-out articles only and not comparable with official dev "
            "figures. max_seq_length 384, doc_stride 128, batch 32. (b)/(c) start from (a) and distill its start/end "
            "logits (hardness 1.0, T 5.5).", "",
            SQUAD_HEAD, *rows, "",
            _commands(runs, ["squad-dense", "squad-gmp80-block4-kd", "squad-gmp90-unstructured-kd"])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_squad", "SQuAD v1.1 on a GPU: dense vs GMP + KD", "\n".join(body))

    rows = []
    for target, label in (("90-unstructured", "90% unstructured"), ("80-block4", "80% block4")):
        cells = []
        for method in ("gmp", "movement", "obs"):
            m = runs.get(f"m5-{method}{target}", {}).get("metrics")
            cells.append(f"{acc(m['validation']):.2f} ({_pct(m['encoder_sparsity'])}%)" if m
                         else runs.get(f"m5-{method}{target}", {}).get("status", "not run"))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    pt = []
    for method in ("gmp", "movement"):
        m = runs.get(f"m5pt-{method}90-unstructured", {}).get("metrics")
        pt.append(f"{method}: {acc(m['validation']):.2f}" if m else f"{method}: {runs.get(f'm5pt-{method}90-unstructured', {}).get('status')}")
    body = [where, "", "SST-2, 16,000 training sentences (seeded subset), 2 epochs, pruning from epoch 0 to 1 (cubic, "
            "mask update every 0.125 epoch), then 1 recovery epoch; every run starts from the full-data dense (a) "
            "above and distills from it (hardness 1.0, T 2); seed 42. oBERT: num_grads 128, fisher_block_size 50 "
            "(unstructured) / 20 (block4), damp 1e-7. Cells: dev accuracy (encoder Linear sparsity).", "",
            "| target | GMP | movement | oBERT |", "|---|---|---|---|", *rows, "",
            "Diagnostic, 90% unstructured from the *pre-trained* model instead of (a) (same budget, KD from (a)): "
            + ", ".join(pt) + ".", "",
            _commands(runs, [n for n in runs if n.startswith("m5")])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_methods", "SST-2 on a GPU: GMP vs movement vs oBERT (gradual)", "\n".join(body))

    def mlm(name: str) -> str:
        m = runs.get(name, {}).get("metrics")
        if not m:
            return runs.get(name, {}).get("status", "not run")
        return ", ".join(f"{split}: ppl {v['perplexity']:.2f}" for split, v in m.items()
                         if isinstance(v, dict) and "perplexity" in v)
    stsb = lambda v: 100 * v["pearson"]  # noqa: E731
    masks = {t: runs.get(f"mask-{t}", {}).get("status") for t in ("sst2-16k", "stsb")}
    body = [where, "",
            f"MLM on the wikipedia sample (held-out shard wiki_15 and WikiText-2 valid): teacher {mlm('mlm-teacher')}; "
            f"80% unstructured student {mlm('mlm-student80')}.", "",
            "Sparse transfer vs the alternatives, same fine-tuning budget per task (SST-2: 16,000 sentences, 2 epochs; "
            "STS-B: full train, 3 epochs). The KD teacher for the sparse runs is the task's dense fine-tune (SST-2: the "
            "full-data (a) above). GMP + KD starts from the pre-trained model, like the transfer run starts from the "
            "sparse pre-trained one.", "",
            SST2_HEAD.replace("| dev |", "| dev (SST-2 acc. / STS-B Pearson) |"),
            _row(runs, "sst2-16k-dense", "SST-2 dense fine-tune", acc, None),
            _row(runs, "sst2-16k-ofa80", "SST-2 Prune OFA 80% transfer (mask locked)", acc,
                 _ref(runs, "sst2-16k-dense", acc)),
            _row(runs, "sst2-16k-gmp80-kd", "SST-2 GMP 80% + KD during fine-tuning", acc,
                 _ref(runs, "sst2-16k-dense", acc)),
            _row(runs, "stsb-dense", "STS-B dense fine-tune", stsb, None),
            _row(runs, "stsb-ofa80", "STS-B Prune OFA 80% transfer (mask locked)", stsb,
                 _ref(runs, "stsb-dense", stsb)),
            _row(runs, "stsb-gmp80-kd", "STS-B GMP 80% + KD during fine-tuning", stsb,
                 _ref(runs, "stsb-dense", stsb)), "",
            "Mask identity (`sparsebert sparsity STUDENT --compare-mask TRANSFERRED`, exit 0 = identical): "
            + ", ".join(f"{t}: {'identical' if s == 'ok' else s}" for t, s in masks.items()) + ".", "",
            _commands(runs, ["mlm-teacher", "mlm-student80", "sst2-16k-dense", "sst2-16k-ofa80", "sst2-16k-gmp80-kd",
                             "stsb-dense", "stsb-ofa80", "stsb-gmp80-kd", "mask-sst2-16k", "mask-stsb"])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_prune_ofa", "Prune Once For All on a GPU: MLM teacher/student, sparse transfer",
                  "\n".join(body))


def _where(device: str, commands: list[str]) -> str:
    """The first line of a GPU section: device, how the runs went, the device commands that reproduce them."""
    return (f"Device: {device}; runs of `benchmarks/gpu_runs.py` side by side on it, bf16 mixed precision (`--bf16`). "
            "Reproduce: " + "; ".join(f"`{c}`" for c in commands) + ". Pre-trained weights: the packaged all-MiniLM-L6-v2 "
            "(FP16 round trip, `benchmarks/gpu_carry.py`; `$MINILM` below).")


def report_long(runs: dict, curves: dict, device: str, commands: list[str]) -> None:
    """Write the session-4 sections (issues 3 and 4 with longer GPU budgets): ``gpu_sst2_long``, ``gpu_squad_long``."""
    acc = lambda v: 100 * v["accuracy"]  # noqa: E731
    where = _where(device, commands)
    ref = _ref(runs, "sst2b128-dense", acc)
    names = ["sst2b128-dense", "sst2b128-gmp80-block4-kd", "sst2b128-gmp80-block4-kd-lr2e-4", "sst2b128-obs80-block4-kd",
             "sst2b128-gmp90-unstructured-kd"]
    labels = ["(a) dense fine-tune", "(b) GMP 80% block4 + KD (shipped recipe)", "(b, LR 2e-4) GMP 80% block4 + KD, init_lr 2e-4",
              "(b, oBERT) oBERT 80% block4 + KD, same schedule", "(c) GMP 90% unstructured + KD"]
    body = [where, "", "SST-2, full train set (67,349), full dev (872), seq 128, **batch 128** (a MiniLM step is launch-bound "
            "on the GPU: 4x the batch costs about the same per step, so 4x the epochs fit), seed 42. Students start from (a) "
            "and distill from it (hardness 1.0, T 2); cubic pruning over the first half of the run, then recovery; epochs "
            "fitted to the time left.", "", SST2_HEAD, *(_row(runs, n, lab, acc, ref) for n, lab in zip(names, labels)), "",
            "Dev accuracy at each epoch end: " + "; ".join(f"{n}: {_epoch_curve(curves, n)}" for n in names[1:]), "",
            _commands(runs, names)]
    write_section(ROOT / "BENCHMARKS.md", "gpu_sst2_long", "SST-2 main job on a GPU: batch 128, longer schedules", "\n".join(body))

    snames = [("squad-dense@call1", "(a) dense fine-tune (call 1)", "squad-dense@call1"),
              ("squad-long-gmp80-block4-kd@call1", "(b) GMP 80% block4 + KD (call 1, from its (a))", "squad-dense@call1"),
              ("squad-long-obs80-block4-kd@call1", "(b, oBERT) oBERT 80% block4 + KD (call 1, from its (a))", "squad-dense@call1"),
              ("squad-dense@call2", "(a) dense fine-tune (call 2, same command)", "squad-dense@call2"),
              ("squad-long-obs80-block4-kd@call2", "(b, oBERT) oBERT 80% block4 + KD (call 2, from its (a))", "squad-dense@call2")]
    rows = [_squad_row(runs, name, label, ref_name) for name, label, ref_name in snames]
    body = [where, "", "SQuAD v1.1, **training used dev articles** (36:12 article split, seed 42, as in the section above; "
            "scores on the 12 held-out articles only), seq 384, doc_stride 128, batch 32. Students from (a), KD on start/end "
            "logits (hardness 1.0, T 5.5), pruning over the first half; epochs fitted to the time left.", "",
            SQUAD_HEAD, *rows, "", _commands(runs, [n for n, _, _ in snames])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_squad_long", "SQuAD v1.1 on a GPU: longer schedules, GMP vs oBERT", "\n".join(body))


def report_sweep(runs: dict, curves: dict, device: str, commands: list[str]) -> None:
    """Write the session-5 section (issue 3: GMP settings side by side; issue 4 rides along): ``gpu_gmp_sweep``."""
    acc = lambda v: 100 * v["accuracy"]  # noqa: E731
    where = _where(device, commands)
    ref = _ref(runs, "sst2b128-dense", acc)
    rows = [("sst2b128-dense", "(a) dense fine-tune"),
            ("sweep-gmp-lr2e-4", "GMP (`gmp80-block4-kd.yaml`), init_lr 2e-4"),
            ("sweep-gmp-lr4e-4", "GMP, init_lr 4e-4"),
            ("sweep-gmp-lr2e-4-t5.5", "GMP, init_lr 2e-4, temperature 5.5"),
            ("sweep-gmp-lr2e-4-global", "GMP, init_lr 2e-4, global_sparsity"),
            ("sweep-gmpstar", "GMP* (`gmpstar80-block4-kd.yaml`): init 50%, 5 spaced steps, LR rewinds, T 5.5, init_lr 2e-4"),
            ("sweep-gmpstar-global", "GMP*, global_sparsity"),
            ("sweep-gmpstar-lr4e-4", "GMP*, init_lr 4e-4")]
    body = [where, "", "SST-2, full train set (67,349), full dev (872), seq 128, batch 128, seed 42, all students 80% block4 "
            "from (a) with KD from it (hardness 1.0), the same 8 epochs; GMP prunes over the first half (cubic, mask update every "
            "0.05 epoch, per layer unless noted), LR linear to 0; GMP* as described in its recipe. Seven students shared the GPU "
            "(wall times are not comparable to single runs).", "", SST2_HEAD, *(_row(runs, n, lab, acc, ref) for n, lab in rows), "",
            "Dev accuracy at each epoch end: " + "; ".join(f"{n}: {_epoch_curve(curves, n)}" for n, _ in rows[1:]), "",
            "SQuAD v1.1 (issue 4), same call, 36:12 article split as above (**training used dev articles**; scores on the 12 "
            "held-out articles): oBERT 80% block4 + KD (`recipes/squad/obs80-block4-kd.yaml`) at init_lr 2e-4, 10 epochs.", "",
            SQUAD_HEAD,
            _squad_row(runs, "squad-dense", "(a) dense fine-tune", "squad-dense"),
            _squad_row(runs, "sweep-squad-obs-lr2e-4", "(b, oBERT) oBERT 80% block4 + KD, init_lr 2e-4", "squad-dense"), "",
            _commands(runs, [n for n, _ in rows] + ["squad-dense", "sweep-squad-obs-lr2e-4"])]
    short = [("sst2b128-dense@call2", "(a) dense fine-tune (call 2, same command)"),
             ("short-gmp-lr4e-4", "GMP, init_lr 4e-4"), ("short-gmp-lr8e-4", "GMP, init_lr 8e-4"),
             ("short-gmp-lr4e-4-t5.5-global", "GMP, init_lr 4e-4, temperature 5.5, global_sparsity"),
             ("short-gmp-lr8e-4-t5.5-global", "GMP, init_lr 8e-4, temperature 5.5, global_sparsity")]
    if any(runs.get(n) for n, _ in short[1:]):
        ref2 = _ref(runs, short[0][0], acc)
        body += ["", "Second call (the device time left, about 4 minutes): the same teacher command again, then four GMP "
                 "students side by side for **3 epochs** (pruning over the first 1.5), to see whether the LR trend goes on past "
                 "4e-4 and whether temperature 5.5 and global ranking add to it:", "", SST2_HEAD,
                 *(_row(runs, n, lab, acc, ref2) for n, lab in short), "",
                 "Dev accuracy at each epoch end: " + "; ".join(f"{n}: {_epoch_curve(curves, n)}" for n, _ in short[1:]), "",
                 _commands(runs, [n for n, _ in short[1:]])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_gmp_sweep", "SST-2 on a GPU: which GMP settings close the gap (session 5)",
                  "\n".join(body))


def report_gmp_levers(runs: dict, device: str, commands: list[str]) -> None:
    """Write the session-21 section (issue 4: GMP's last levers on SQuAD, 20 epochs each): ``gpu_squad_gmp_levers``."""
    names = [("squad-dense", "(a) dense fine-tune"),
             ("s16-squad-gmp-20ep", "(b) GMP 80% block4 + KD, init_lr 4e-4, per-layer ranking"),
             ("s21-squad-gmp-20ep-global", "(b) same, global_sparsity (one threshold over all layers)"),
             ("s21-squad-gmp-20ep-lr8e-4", "(b) same as the first, init_lr 8e-4")]
    body = [_where(device, commands), "",
            "SQuAD v1.1, **training used dev articles** (36:12 article split, seed 42; scores on the 12 held-out articles "
            "only), seq 384, doc_stride 128, batch 32. Students from (a) with KD from it on start/end logits (hardness 1.0, "
            "T 5.5, padding left out of the softmax, teacher outputs cached), 20 epochs, cubic pruning to 80% block4 over "
            "the first 10, LR linear to 0. The three students shared the GPU.", "",
            SQUAD_HEAD, *(_squad_row(runs, n, label, "squad-dense") for n, label in names), "",
            _commands(runs, [n for n, _ in names])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_squad_gmp_levers",
                  "SQuAD v1.1 on a GPU: GMP over 20 epochs, global ranking, twice the LR (issue 4, session 21)", "\n".join(body))


def runs_from_logs(folder: Path) -> tuple[dict, dict[str, list[float]]]:
    """Runs started by hand on a device (not through ``gpu_runs.py``): ``NAME.metrics.json`` per run, its CLI
    output in ``logs.tar.gz`` as ``NAME.log`` (the per-epoch ``eval_validation_accuracy`` lines are read from it)."""
    import re
    import tarfile

    runs = {p.name.removesuffix(".metrics.json"): {"status": "ok", "metrics": json.loads(p.read_text())}
            for p in sorted(folder.glob("*.metrics.json"))}
    curves: dict[str, list[float]] = {}
    with tarfile.open(folder / "logs.tar.gz") as tar:
        for member in tar.getmembers():
            text = tar.extractfile(member).read().decode(errors="replace")
            found = re.findall(r"'eval_validation_accuracy': '([0-9.]+)'", text)
            curves[member.name.removesuffix(".log")] = [float(a) for a in found]
    return runs, curves


def report_next(runs: dict, curves: dict, device: str, commands: list[str]) -> None:
    """Write the session-7 section (issue 3: session 5's best GMP settings combined, longer; issue 4: oBERT on
    SQuAD at init_lr 4e-4): ``gpu_gmp_next``. ``runs``/``curves`` hold call 1 (``gpu_runs.py``) and call 2
    (:func:`runs_from_logs`)."""
    acc = lambda v: 100 * v["accuracy"]  # noqa: E731
    ref = _ref(runs, "sst2b128-dense", acc)
    rows1 = [("sst2b128-dense", "(a) dense fine-tune"),
             ("next-gmp-lr4e-4-t5.5-global", "GMP, init_lr 4e-4, temperature 5.5, global_sparsity, prune to epoch 4.5"),
             ("next-gmp-lr3e-4-t5.5-global", "GMP, init_lr 3e-4, temperature 5.5, global_sparsity, prune to epoch 4.5"),
             ("next-gmp-lr4e-4-t5.5", "GMP, init_lr 4e-4, temperature 5.5 (per layer), prune to epoch 4.5")]
    rows2 = [("s7-lr4e-4-t5.5-global-10ep", "GMP, init_lr 4e-4, temperature 5.5, global_sparsity, prune to epoch 5"),
             ("s7-lr4e-4-t5.5-global-10ep-pe4", "GMP, init_lr 4e-4, temperature 5.5, global_sparsity, prune to epoch 4"),
             ("s7-lr5e-4-t5.5-global-10ep", "GMP, init_lr 5e-4, temperature 5.5, global_sparsity, prune to epoch 5")]
    body = [_where(device, commands[:1]) + " Call 2 (the same warm machine, the device time left) ran three more students "
            f"from call 1's teacher by hand: `{commands[1]}`.", "",
            "SST-2, full train set (67,349), full dev (872), seq 128, batch 128, seed 42, students 80% block4 from (a) with "
            "KD from it (hardness 1.0), `recipes/glue/gmp80-block4-kd.yaml` with the overrides below (cubic pruning from "
            "epoch 0, mask update every 0.05 epoch, LR linear to 0). Call 1: 3 students + the SQuAD run shared the GPU, "
            "9 epochs fitted; call 2: 3 students, 10 epochs.", "", SST2_HEAD,
            *(_row(runs, n, lab, acc, ref) for n, lab in rows1 + rows2), "",
            "Dev accuracy at each epoch end: " + "; ".join(f"{n}: {_epoch_curve(curves, n)}" for n, _ in rows1[1:] + rows2), "",
            "SQuAD v1.1 (issue 4), call 1, 36:12 article split (**training used dev articles**; scores on the 12 held-out "
            "articles): oBERT 80% block4 + KD at init_lr 4e-4 (session 5: 2e-4, 10 epochs, F1 -3.02).", "",
            SQUAD_HEAD,
            _squad_row(runs, "squad-dense", "(a) dense fine-tune", "squad-dense"),
            _squad_row(runs, "next-squad-obs-lr4e-4", "(b, oBERT) oBERT 80% block4 + KD, init_lr 4e-4", "squad-dense"), "",
            _commands(runs, [n for n, _ in rows1] + ["squad-dense", "next-squad-obs-lr4e-4"])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_gmp_next", "SST-2 on a GPU: session 5's best GMP settings combined (session 7)",
                  "\n".join(body))


def report_seeds(runs: dict, curves: dict, device: str, commands: list[str]) -> None:
    """Write the session-9 section (issue 3: session 7's best GMP student over four seeds against the dense
    fine-tune's seed spread; issue 4: GMP at init_lr 4e-4 and oBERT at 6e-4 on SQuAD): ``gpu_seeds``.
    ``runs`` holds session 7's call 1 (for seed 42), session 9's call 1 and call 2 (:func:`runs_from_logs`)."""
    import statistics

    acc = lambda v: 100 * v["accuracy"]  # noqa: E731
    ref = _ref(runs, "sst2b128-dense", acc)
    dense = [("sst2b128-dense", "(a) dense fine-tune, seed 42 (the teacher)"),
             ("s9-dense-seed1", "dense fine-tune, seed 1"), ("s9-dense-seed2", "dense fine-tune, seed 2")]
    gmp = [("next-gmp-lr4e-4-t5.5-global", "(b) GMP, seed 42 (session 7)"),
           ("s9-gmp-seed1", "(b) GMP, seed 1"), ("s9-gmp-seed2", "(b) GMP, seed 2"), ("s9-gmp-seed3", "(b) GMP, seed 3")]

    def stats(names: list[tuple[str, str]]) -> tuple[float, float, int]:
        vals = [acc(runs[n]["metrics"]["validation"]) for n, _ in names if runs.get(n, {}).get("metrics")]
        return statistics.mean(vals), statistics.stdev(vals), len(vals)

    dm, ds, dn = stats(dense)
    gm, gs, gn = stats(gmp)
    body = [_where(device, commands[:1]) + f" Call 2 (the same warm machine) ran the three seed students from call 1's "
            f"teacher by hand: `{commands[1]}`. Seed 42's student is session 7's run (`gpu_gmp_next` above; same command, "
            "same teacher weights: the teacher reads 88.99 in every session).", "",
            "SST-2, full train set (67,349), full dev (872), seq 128, batch 128. Students: 80% block4 from (a) with KD from "
            "it (hardness 1.0), `recipes/glue/gmp80-block4-kd.yaml` with session 7's best overrides (init_lr 4e-4, temperature "
            "5.5, global_sparsity, 9 epochs, cubic pruning to epoch 4.5, LR linear to 0); only `--seed` differs (data order, "
            "dropout). Dense runs: `recipes/glue/dense.yaml`, 3 epochs.", "", SST2_HEAD,
            *(_row(runs, n, lab, acc, ref) for n, lab in dense + gmp), "",
            "| summary | dev | Δ |", "|---|---|---|",
            f"| dense, mean +- std over {dn} seeds | {dm:.2f} +- {ds:.2f} | |",
            f"| (b) GMP, mean +- std over {gn} seeds | {gm:.2f} +- {gs:.2f} | {gm - ref:+.2f} vs (a); {gm - dm:+.2f} vs the dense mean |",
            "", "Dev accuracy at each epoch end: " + "; ".join(f"{n}: {_epoch_curve(curves, n)}" for n, _ in gmp), "",
            "SQuAD v1.1 (issue 4), call 1, 36:12 article split (**training used dev articles**; scores on the 12 held-out "
            "articles), students from (a) with KD on start/end logits (hardness 1.0, T 5.5), epochs fitted to the time left. "
            "GMP had only run at the recipe's init_lr 1e-4 (16 epochs: F1 49.3, session 4); oBERT at 2e-4 / 4e-4 had "
            "given -3.02 / -2.65.", "", SQUAD_HEAD,
            _squad_row(runs, "squad-dense", "(a) dense fine-tune", "squad-dense"),
            _squad_row(runs, "s9-squad-gmp-lr4e-4", "(b) GMP 80% block4 + KD, init_lr 4e-4", "squad-dense"),
            _squad_row(runs, "s9-squad-obs-lr6e-4", "(b, oBERT) oBERT 80% block4 + KD, init_lr 6e-4", "squad-dense"), "",
            _commands(runs, [n for n, _ in dense] + ["squad-dense", "s9-squad-gmp-lr4e-4", "s9-squad-obs-lr6e-4"])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_seeds", "SST-2 on a GPU: the best GMP student over four seeds (session 9)",
                  "\n".join(body))


def report_layerwise(runs: dict, curves: dict, device: str, commands: list[str]) -> None:
    """Write the session-11 section (issues 3 and 4: per-layer distillation added to session 9's students, paired by
    seed and schedule): ``gpu_layerwise``. ``runs``/``curves`` hold session 7's call 1 (seed 42's baseline), session
    9's calls 1 and 2 (:func:`runs_from_logs`) and session 11's call. Session 11's SST-2 students were killed at the
    deadline after epoch 7 of 9, so the SST-2 comparison is per epoch end, over the epochs both sides reached."""
    import statistics

    acc = lambda v: 100 * v["accuracy"]  # noqa: E731
    ref = _ref(runs, "sst2b128-dense", acc)
    pairs = list(LOGITS_KD_BY_SEED.items())
    base = {seed: [100 * a for a in curves.get(n, [])] for seed, n in pairs}
    lw = {seed: [100 * a for a in curves.get(LAYERWISE_BY_SEED[seed], [])] for seed, _ in pairs}
    n_ep = min(len(c) for c in [*base.values(), *lw.values()])
    if n_ep == 0:
        raise SystemExit("gpu_report: no per-epoch evals for the per-layer students (is results.tar.gz beside the summary?)")
    rows = []
    for seed, name in pairs:
        b, l = base[seed][:n_ep], lw[seed][:n_ep]
        final = runs.get(name, {}).get("metrics")
        rows.append(f"| {seed} | {', '.join(f'{x:.2f}' for x in b)} | {', '.join(f'{x:.2f}' for x in l)} "
                    f"| {l[-1] - b[-1]:+.2f} | {acc(final['validation']):.2f} | "
                    f"{runs.get(LAYERWISE_BY_SEED[seed], {}).get('status', 'not run')} |")
    mean_b = [statistics.mean(base[s][e] for s in base) for e in range(n_ep)]
    mean_l = [statistics.mean(lw[s][e] for s in lw) for e in range(n_ep)]
    last_l = [lw[s][n_ep - 1] for s in lw]
    final_b = [acc(runs[n]["metrics"]["validation"]) for _, n in pairs]
    body = [_where(device, commands[:1]) + " Seed 42's baseline is session 7's run, seeds 1-3 session 9's call 2 "
            "(`gpu_seeds` above); the teacher reads 88.99 again (same command, every session).", "",
            "SST-2, full train set (67,349), full dev (872), batch 128. Every student: 80% block4 from (a), KD from it on the "
            "logits (T 5.5, hardness 1.0), init_lr 4e-4, global_sparsity, 9 epochs, cubic pruning to epoch 4.5. The per-layer "
            "students run `recipes/glue/gmp80-block4-kd-layerwise.yaml` (the same recipe + `PerLayerDistillationModifier`, "
            "normalized MSE of each of the 6 encoder layers' outputs, gain 1.0). Only the per-layer term differs within a "
            "pair (same teacher weights, seed, schedule and data order). **The four per-layer runs were killed at the "
            f"deadline at epoch ~7.2 of 9** (6 runs shared the GPU: ~8.5 steps/s each), so there is no epoch-9 number for them; "
            f"the table compares dev accuracy at each epoch end that both sides reached (1-{n_ep}), at the same LR.", "",
            f"| seed | dev at epochs 1-{n_ep}, logits KD | dev at epochs 1-{n_ep}, + per-layer KD | Δ at epoch {n_ep} "
            "| logits KD, epoch 9 (final) | per-layer run |", "|---|---|---|---|---|---|", *rows, "",
            "| mean over the 4 seeds | " + " | ".join(f"epoch {e + 1}" for e in range(n_ep)) + " |",
            "|---|" + "---|" * n_ep,
            "| logits KD | " + " | ".join(f"{x:.2f}" for x in mean_b) + " |",
            "| + per-layer KD | " + " | ".join(f"{x:.2f}" for x in mean_l) + " |",
            "| Δ | " + " | ".join(f"{l - b:+.2f}" for b, l in zip(mean_b, mean_l)) + " |", "",
            f"At epoch {n_ep} the per-layer students read {statistics.mean(last_l):.2f} +- {statistics.stdev(last_l):.2f} "
            f"(mean +- std, 4 seeds), {statistics.mean(last_l) - ref:+.2f} vs (a) {ref:.2f}; the logits-KD students read "
            f"{mean_b[-1]:.2f} at epoch {n_ep} and {statistics.mean(final_b):.2f} +- {statistics.stdev(final_b):.2f} at epoch 9 "
            "(final).", "",
            "SQuAD v1.1 (issue 4), same call, 36:12 article split (**training used dev articles**; scores on the 12 held-out "
            "articles), KD on start/end logits (T 5.5) from this call's (a), with session 9's init_lr and epochs. Paired with "
            "session 9's runs (`gpu_seeds`), which lack only the per-layer term; each Δ is against its own session's (a).", "",
            SQUAD_HEAD,
            _squad_row(runs, "squad-dense@call2", "(a) dense fine-tune, session 9", "squad-dense@call2"),
            _squad_row(runs, "s9-squad-gmp-lr4e-4", "GMP 80% block4 + KD, init_lr 4e-4, 12 epochs (session 9)", "squad-dense@call2"),
            _squad_row(runs, "s9-squad-obs-lr6e-4", "oBERT 80% block4 + KD, init_lr 6e-4, 8 epochs (session 9)", "squad-dense@call2"),
            _squad_row(runs, "squad-dense@call3", "(a) dense fine-tune, session 11", "squad-dense@call3"),
            _squad_row(runs, "s10-squad-gmp-layerwise", "GMP + per-layer KD, init_lr 4e-4, 12 epochs", "squad-dense@call3"),
            _squad_row(runs, "s10-squad-obs-layerwise", "oBERT + per-layer KD, init_lr 6e-4, 8 epochs", "squad-dense@call3"), "",
            _commands(runs, ["sst2b128-dense", *LAYERWISE_BY_SEED.values(), "squad-dense",
                             "s10-squad-gmp-layerwise", "s10-squad-obs-layerwise"])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_layerwise",
                  "SST-2 and SQuAD on a GPU: per-layer distillation, paired with the logits-KD students (session 11)",
                  "\n".join(body))


def report_layerwise_final(runs: dict, curves: dict, device: str, commands: list[str]) -> None:
    """Write the section for the rerun of session 11's per-layer SST-2 students to the end (queued for session 12):
    ``gpu_layerwise_final``. ``runs``/``curves`` as for :func:`report_layerwise`, with the rerun's summary last.
    A run stopped at the deadline (SIGTERM, ``stopped_early``) is shown as such and kept out of the means."""
    import statistics

    acc = lambda v: 100 * v["accuracy"]  # noqa: E731
    ref = _ref(runs, "sst2b128-dense", acc)
    base = [(n, f"logits KD, seed {seed} (session {7 if seed == 42 else 9})") for seed, n in LOGITS_KD_BY_SEED.items()]
    lw = [(n, f"+ per-layer KD, seed {seed}") for seed, n in LAYERWISE_BY_SEED.items()]

    def finals(names: list[tuple[str, str]], near_end: bool = False) -> list[float]:
        """Final dev accuracies of the finished runs; ``near_end``: also those stopped in their last 1% of steps."""
        ms = [runs.get(n, {}).get("metrics") for n, _ in names]
        return [acc(m["validation"]) for m in ms if m and (not m.get("stopped_early") or
                (near_end and m["stopped_early"]["epoch"] >= 0.99 * m["epochs"]))]

    fb, fl, fl_near = finals(base), finals(lw), finals(lw, near_end=True)
    summary = ["| summary | dev | Δ vs (a) |", "|---|---|---|"]
    rows = [("logits KD", fb), ("+ per-layer KD, finished runs", fl)]
    if len(fl_near) > len(fl):
        rows.append(("+ per-layer KD, also counting runs stopped in their last 1% of steps", fl_near))
    for label, vals in rows:
        if len(vals) >= 2:
            m = statistics.mean(vals)
            summary.append(f"| {label}, mean +- std over {len(vals)} seeds | {m:.2f} +- {statistics.stdev(vals):.2f} | {m - ref:+.2f} |")
    paired = [acc(runs[l]["metrics"]["validation"]) - acc(runs[b]["metrics"]["validation"])
              for (b, _), (l, _) in zip(base, lw)
              if runs.get(l, {}).get("metrics") and not runs[l]["metrics"].get("stopped_early") and runs.get(b, {}).get("metrics")]
    verdict = "no finished per-layer run"
    if fl:
        gap = statistics.mean(fl) - ref
        verdict = (f"the finished per-layer students' mean is {gap:+.2f} vs (a): issue 3's target (within 1.0) is "
                   f"{'met' if gap >= -1.0 else 'missed'} over {len(fl)} seed(s)")
        if len(fl_near) > len(fl):
            verdict += f" ({statistics.mean(fl_near) - ref:+.2f} over {len(fl_near)} counting the near-complete runs)"
        if paired:
            verdict += f"; paired with the logits-KD students the term adds {statistics.mean(paired):+.2f} on average ({len(paired)} seeds)"
    body = [_where(device, commands), "",
            "SST-2, full train set (67,349), full dev (872), batch 128. Every student: 80% block4 from (a), KD from it on the "
            "logits (T 5.5, hardness 1.0), init_lr 4e-4, global_sparsity, 9 epochs, cubic pruning to epoch 4.5; the per-layer "
            "students add `PerLayerDistillationModifier` (`recipes/glue/gmp80-block4-kd-layerwise.yaml`, gain 1.0). The "
            "logits-KD students are sessions 7 and 9's runs (same command and teacher weights; the teacher reads 88.99 in every "
            "session).", "", SST2_HEAD, _row(runs, "sst2b128-dense", "(a) dense fine-tune (the teacher)", acc),
            *(_row(runs, n, lab, acc, ref) for n, lab in base + lw), "", *summary, "", f"**{verdict[0].upper() + verdict[1:]}.**", "",
            "Dev accuracy at each epoch end: " + "; ".join(f"{n}: {_epoch_curve(curves, n)}" for n, _ in base + lw), "",
            _commands(runs, ["sst2b128-dense", *(n for n, _ in lw)])]
    write_section(ROOT / "BENCHMARKS.md", "gpu_layerwise_final",
                  "SST-2 on a GPU: per-layer distillation for the GMP student, to the end of its schedule",
                  "\n".join(body))


def finished_from_logs(tarball: Path) -> dict[str, dict]:
    """Runs whose training finished (the Trainer's closing ``train_runtime`` record is in ``train_log.jsonl``) but
    that were killed before writing ``metrics.json`` (a deadline's SIGTERM during the final evaluation and save,
    before ``sparsebert train`` held such signals): their metrics are the last epoch-end eval, which the Trainer
    logged on the final weights. ``encoder_sparsity`` is ``None`` (not measured); ``from_train_log`` marks them."""
    import tarfile

    found: dict[str, dict] = {}
    with tarfile.open(tarball) as tar:
        names = {m.name for m in tar.getmembers()}
        for name in names:
            run = name.split("/")[0]
            if not name.endswith("train_log.jsonl") or f"{run}/metrics.json" in names:
                continue
            records = [json.loads(line) for line in tar.extractfile(name).read().decode().splitlines()]
            end = [r for r in records if "train_runtime" in r]
            evals = [r for r in records if "eval_validation_accuracy" in r]
            if end and evals and evals[-1]["epoch"] == end[-1]["epoch"]:
                found[run] = {"status": "finished; metrics.json not written", "metrics": {
                    "validation": {"accuracy": evals[-1]["eval_validation_accuracy"]}, "encoder_sparsity": None,
                    "epochs": end[-1]["epoch"], "train_wall_seconds": end[-1]["train_runtime"], "from_train_log": True}}
    return found


def epoch_curves(tarball: Path) -> dict[str, list[float]]:
    """Per-run list of ``eval_validation_accuracy`` values logged by ``--eval-each-epoch``."""
    import tarfile

    curves: dict[str, list[float]] = {}
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            if member.name.endswith("train_log.jsonl"):
                for line in tar.extractfile(member).read().decode().splitlines():
                    rec = json.loads(line)
                    for k, v in rec.items():
                        if k.startswith("eval_") and k.endswith("_accuracy"):
                            curves.setdefault(member.name.split("/")[0], []).append(v)
    return curves


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", type=Path, nargs="+", help="summary.json of each call (later calls win on a name)")
    ap.add_argument("--device", required=True)
    ap.add_argument("--command", required=True, action="append", help="the device command of each call")
    ap.add_argument("--long", action="store_true", help="write the session-4 sections (batch-128 SST-2, long SQuAD)")
    ap.add_argument("--sweep", action="store_true", help="write the session-5 section (GMP settings side by side)")
    ap.add_argument("--next", type=Path, metavar="CALL2_DIR",
                    help="write the session-7 section; CALL2_DIR holds the hand-started runs (see runs_from_logs)")
    ap.add_argument("--seeds", type=Path, metavar="CALL2_DIR", help="write the session-9 section (as --next)")
    ap.add_argument("--gmp-levers", action="store_true", help="write the session-21 section (SQuAD GMP, 20 epochs)")
    ap.add_argument("--final", action="store_true", help="with --layerwise: write the rerun's section (its summary last)")
    ap.add_argument("--layerwise", type=Path, metavar="S9_CALL2_DIR",
                    help="write the session-11 section: summaries of sessions 7, 9 and 11 in that order (as --seeds)")
    a = ap.parse_args()
    curves: dict[str, list[float]] = {}
    runs: dict = {}
    for i, summary in enumerate(a.summary, 1):
        done = {k: v for k, v in json.loads(summary.read_text())["runs"].items() if v.get("status") != "skipped"}
        for tarball in sorted(summary.parent.glob("*.tar.gz")):  # the run folders' small files, per call
            curves.update(epoch_curves(tarball))
            for name, run in finished_from_logs(tarball).items():
                if not done.get(name, {}).get("metrics"):
                    done[name] = {**run, "cmd": done.get(name, {}).get("cmd")}
        runs.update(done)  # by name: the latest call's run
        runs.update({f"{k}@call{i}": v for k, v in done.items()})  # by name and call
    if a.seeds or a.next or a.layerwise:  # a second call's hand-started runs
        more, more_curves = runs_from_logs(a.seeds or a.next or a.layerwise)
        runs.update(more)
        curves.update(more_curves)
    if a.gmp_levers:
        report_gmp_levers(runs, a.device, a.command)
    elif a.layerwise and a.final:
        report_layerwise_final(runs, curves, a.device, a.command)
    elif a.layerwise:
        report_layerwise(runs, curves, a.device, a.command)
    elif a.seeds:
        report_seeds(runs, curves, a.device, a.command)
    elif a.next:
        report_next(runs, curves, a.device, a.command)
    elif a.sweep:
        report_sweep(runs, curves, a.device, a.command)
    elif a.long:
        report_long(runs, curves, a.device, a.command)
    else:
        report({"runs": runs}, curves, a.device, a.command[0])
