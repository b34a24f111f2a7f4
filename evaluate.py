"""
evaluate.py - the paper's measurements (its "Experimental setup": Table 2 metrics, Table 1 check):
  T2T accuracy: typed question -> text answer (the LLM's retained text ability),
  S2T accuracy: spoken question -> text answer (spoken QA),
  ASR WER, corpus level, and perplexity of held-out answers (used by the Table 1 check);
and train.py's measurement stages: the original LLM's importance (analyse_original), each fine-tuned
method's numbers and importance shift (measure), the printed report (Tables 1, 2, Fig. 2, trade-off).

Accuracy = the normalised gold answer appears as a whole word sequence in the normalised generated answer
("contains", as in the paper [inferred]) and no other gold answer (of the same relation, where rows name one) does
(`right`); normalised exact match of the answer's first line is reported beside it.
Normaliser: lower-case, every character that is not a letter, digit or space becomes a space, runs of
spaces collapse. WER = (substitutions + deletions + insertions) / reference words, summed over the corpus.

    python evaluate.py runs/default        # prints the results table of a finished run
"""
import json
import math
import os
import re
import sys

import torch

import importance as imp
import lora
from model import autocast


def normalize(text):
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def edit_distance(ref, hyp):
    """Levenshtein distance between two word lists (S + D + I of the best alignment)."""
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[-1]


def wer(refs, hyps):
    errors = sum(edit_distance(normalize(r).split(), normalize(h).split()) for r, h in zip(refs, hyps))
    return errors / max(1, sum(len(normalize(r).split()) for r in refs))


def contains(gold, pred):
    return f" {normalize(gold)} " in f" {normalize(pred)} "


def right(rows, preds):
    """Per row: the gold answer is contained in the prediction ("contains", the paper's measure [inferred]) and
    no other gold answer of the same relation is (rows without a "relation": of any row), so listing candidates
    ("red blue green ...") never counts as an answer, while a real LLM's sentence may use common words."""
    golds = {}
    for r in rows:
        golds.setdefault(r.get("relation"), set()).add(normalize(r["answer"]))
    def ok(gold, pred, rel):
        others = [o for o in golds[rel] if o != normalize(gold) and not contains(o, gold)]
        return contains(gold, pred) and not any(contains(o, pred) for o in others)
    return [ok(r["answer"], p, r.get("relation")) for r, p in zip(rows, preds)]


def exact(gold, pred):
    """Normalised exact match of the prediction's first line (an instruct LLM may add a sentence below)."""
    return normalize(gold) == normalize(pred.strip().split("\n")[0])


@torch.no_grad()
def generate(model, rows, make, tok, batch_size=64, max_new_tokens=16):
    """make: rows -> batch (data.make_batch with the input modality bound: typed or spoken)."""
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        out += [tok.decode(t) for t in model.generate(make(rows[i:i + batch_size]), max_new_tokens, tok.eos_id)]
    return out


def accuracy(model, rows, make, tok):
    """-> (contains-accuracy, exact-match accuracy, predictions)."""
    preds = generate(model, rows, make, tok)
    acc = sum(right(rows, preds)) / len(rows)
    em = sum(exact(r["answer"], p) for r, p in zip(rows, preds)) / len(rows)
    return acc, em, preds


@torch.no_grad()
def perplexity(model, rows, make, batch_size=64):
    """exp(mean cross-entropy of the answer tokens + EOS), over all tokens of all rows."""
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = make(rows[i:i + batch_size])
        nll += model.loss(batch, reduction="sum").item()
        n += sum(len(a) for a in batch["answers"])
    return math.exp(min(nll / n, 700))


def evaluate_all(model, rows, tok, make_text, make_speech):
    """The numbers every method is compared on (Table 2): T2T and S2T on the test split, WER on asr_test; the same
    on the val split as val_* (settings are chosen on those, never on test)."""
    out = {}
    for split, pre in (("test", ""), ("val", "val_")):
        qs = [r for r in rows if r["split"] == split]
        if qs:
            out[pre + "t2t_acc"], out[pre + "t2t_em"], _ = accuracy(model, qs, make_text, tok)
            out[pre + "s2t_acc"], out[pre + "s2t_em"], _ = accuracy(model, qs, make_speech, tok)
    asr = [r for r in rows if r["split"] == "asr_test"]
    if asr:  # a manifest without an asr_test split gets no WER
        out["wer"] = wer([r["transcript"] for r in asr], generate(model, asr, make_speech, tok, max_new_tokens=32))
    return out


def importance(model, rows, make, kind="taylor", batch_size=32, rank=0, world=1, per_row=None):
    """Importance (importance.py: estimate_importance) over calibration rows: "taylor" in batches of batch_size (the
    mean gradient does not depend on them), the others per sample, one row a batch. Under DDP each rank takes
    every world-th batch and the sums are all-reduced: the same result. per_row (a list; not taylor): each row's
    importance per layer is appended, from every rank."""
    batch_size = batch_size if kind == "taylor" else 1
    batches = [make(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    mine = [] if per_row is not None else None
    scores = imp.estimate_importance(model, batches[rank::world], kind, all_reduce=world > 1, per_batch=mine)
    if per_row is not None:
        parts = [mine]
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, mine)
        # one row a batch, and rank r took rows r, r + world, ...: back in row order, as one process has them
        per_row.extend(parts[i % world][i // world] for i in range(len(rows)))
    return scores


def table1_check(model, scores, rows, make, seed=0):
    """Table 1: perplexity of the rows' answers after zeroing the top / bottom / random 3% of the weights by
    `scores`, and each as a multiple of the unmasked baseline."""
    t1 = imp.table1(model, scores, lambda: perplexity(model, rows, make), frac=0.03, seed=seed)
    ratios = {f"{k}_ratio": t1[k] / t1["baseline"] for k in ("top", "bottom", "random")}
    return {**{f"{k}_ppl": v for k, v in t1.items()}, "n_rows": len(rows), **ratios}


# -----------------------------------------------------------------------------
# The measurement stages of train.py: the original LLM's importance, each method's numbers, the report

def analyse_original(run, model, d, tc, kind, seed):
    """Stage 3: the original LLM's textual importance (transcripts typed) and speech importance (audio) on the
    calibration rows; Table 1 on the test questions, all of them and those it answers right from that input
    (where it is wrong it is often confidently wrong, and any perturbation that flattens it lowers perplexity);
    the noise floor: the same model on the second calibration set, and (per-sample kinds) over 200 random pairs of
    disjoint sets drawn from both sets' rows. -> OUT/importance_original.pt"""
    test, rep = d.split("test"), run.report
    val, imps = {}, {}
    per_row = [] if kind != "taylor" else None  # per-sample kinds: each calibration row's textual importance per layer
    with autocast(tc.device, tc.dtype):
        for inp, make in (("text", d.text_batch), ("speech", d.ft_batch)):
            preds = accuracy(model, test, make, d.tok)[2]
            answered = [r for r, ok in zip(test, right(test, preds)) if ok]
            scores = importance(model, d.calib, make, kind, tc.batch_size, tc.rank, tc.world,
                                per_row if inp == "text" else None)
            t1 = {sub: table1_check(model, scores, rows, make, seed)
                  for sub, rows in (("all", test), ("answered", answered)) if rows}
            rep["distribution"][f"original_{inp}"] = imp.layer_distribution(scores)
            rep["top5_share"][f"original_{inp}"] = imp.top_share_by_layer(scores, 0.05)
            rep[f"table1_{inp}"] = {sub: t1.get(sub) for sub in ("all", "answered")}
            val[inp] = {**t1["all"], "answered": t1.get("answered", {})}
            imps[inp] = scores
        text, text2 = imps["text"], None
        if len(d.calib2) == len(d.calib):  # no noise floor if the pool is too small for two sets
            text2 = importance(model, d.calib2, d.text_batch, kind, tc.batch_size, tc.rank, tc.world, per_row)
            rep["noise_floor"] = imp.shift_metrics(text, text2)
            run.results["importance_noise_js"] = rep["noise_floor"]["js"]
            run.results["importance_noise_total_ratio"] = rep["noise_floor"]["total_ratio"]
            if per_row:  # the two sets are one draw of the noise; random pairs from both sets' rows give its mean
                rep["noise_floor_resampled"] = imp.noise_floor(per_row, len(d.calib), seed=seed)
                run.results["importance_noise_js_mean"] = rep["noise_floor_resampled"]["mean"]
                run.results["importance_noise_js_p90"] = rep["noise_floor_resampled"]["p90"]
    rep["concentration"] = {"original_text": imp.concentration(text)}  # Fig. 1: rows / columns
    run.results["importance_validation"] = {**val["text"], "speech": val["speech"]}
    run.save_report()
    return {"text": text, "text2": text2}


def measure(run, name, model, w0, d, tc, original, kind):
    """Stage 5, one method: T2T / S2T / WER, and the textual importance of the weights the model uses (W + BA)
    against the original's, on both calibration sets; ΔW's row/column structure (Fig. 4)."""
    with autocast(tc.device, tc.dtype):
        m = evaluate_all(model, d.rows, d.tok, d.text_batch, d.ft_batch)
    lora.merge_lora(model)  # in fp32, outside autocast
    with autocast(tc.device, tc.dtype):
        text = importance(model, d.calib, d.text_batch, kind, tc.batch_size, tc.rank, tc.world)
        text2 = None if original["text2"] is None else \
            importance(model, d.calib2, d.text_batch, kind, tc.batch_size, tc.rank, tc.world)
    shift = imp.shift_metrics(original["text"], text)
    m.update(importance_js=shift["js"], importance_spearman=shift["spearman"], importance_shift=shift)
    if text2 is not None:  # the same shift on the second set: does the order of methods hold?
        m["importance_shift_2"] = imp.shift_metrics(original["text2"], text2)
    run.report["distribution"][name] = imp.layer_distribution(text)
    run.report["top5_share"][name] = imp.top_share_by_layer(text, 0.05)
    dw = {k: v.detach().cpu() - w0[k] for k, v in imp.importance_params(model).items()}  # ΔW (LoRA: BA)
    if any(x.any() for x in dw.values()):  # Fig. 4: does ΔW gather on a few rows/columns too?
        run.report.setdefault("concentration", {})[f"{name}_delta_w"] = imp.concentration(dw)
        m["delta_w_concentration"] = run.report["concentration"][f"{name}_delta_w"]["all"]["ratio"]
    return m


def report(run):
    """Fig. 2 analogue (terminal bars + OUT/importance.png), Fig. 1/4 concentration, Tables 1 and 2."""
    dists = {k: v for k, v in run.report["distribution"].items() if k != "original_speech"}
    print("\nLayer-wise textual importance (Fig. 2 analogue):\n" + imp.bar_chart(dists))
    png = imp.plot_distributions(dists, run.path("importance.png")) if run.master else None
    if png:
        print(f"figure: {png}")
    conc = {k: v["all"]["ratio"] for k, v in run.report.get("concentration", {}).items()}
    print("top-5% entries on the fullest 5% of rows/cols, x an even spread (Fig. 1/4; 1 = no structure): "
          + ", ".join(f"{k} {v:.1f}" for k, v in conc.items()))
    print(format_table(run.results))
    print(format_table1(run.results))
    print(format_tradeoff(run.results))
    if run.master and plot_tradeoff(run.results, run.path("tradeoff.png")):
        print(f"figure: {run.path('tradeoff.png')}")


def mean_sd(runs):
    """Mean and sample sd (n - 1) of every number in a list of results.json dicts (e.g. one per seed), as
    dicts of the same nesting. A number missing from any run is left out."""
    def leaves(d, pre=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(leaves(v, f"{pre}{k}."))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{pre}{k}"] = v
        return out
    def nest(flat):
        out = {}
        for k, v in flat.items():
            *path, last = k.split(".")
            d = out
            for p in path:
                d = d.setdefault(p, {})
            d[last] = v
        return out
    flat = [leaves(r) for r in runs]
    keys = [k for k in flat[0] if all(k in f for f in flat)]
    mean = {k: sum(f[k] for f in flat) / len(flat) for k in keys}
    sd = {k: (sum((f[k] - mean[k]) ** 2 for f in flat) / max(1, len(flat) - 1)) ** 0.5 for k in keys}
    return nest(mean), nest(sd)


def format_table(results, sd=None):
    """The Table 2 analogue (%, mean ± sd when sd is given) from a results.json dict: accuracy as "contains" and
    exact match (EM), test split; the importance shift of each method beside its noise floor. No fine-tuning =
    the aligned model with the original LLM."""
    def cell(m, s, k, w=13):
        if k not in m:
            return f"{'-':>{w}}"
        txt = f"{100 * m[k]:.1f}" + (f" ± {100 * s[k]:.1f}" if s and k in s else "")
        return f"{txt:>{w}}"
    keys = ("t2t_acc", "t2t_em", "s2t_acc", "s2t_em", "wer")
    lines = [f"{'method':<16}" + "".join(f"{h:>13}" for h in ("T2T", "T2T EM", "S2T", "S2T EM", "WER"))
             + f"{'dT2T vs full':>14}{'dS2T vs full':>14}{'importance JS':>15}{'JS, 2nd set':>13}{'x noise':>9}"
             + f"{'importance sum':>16}"]
    # "x noise": the shift over the noise floor, its mean over random pairs of calibration sets where measured
    # (per-sample kinds), else the one pair of sets the run drew
    noise = results.get("importance_noise_js_mean", results.get("importance_noise_js"))
    sd = sd or {}
    rows = [("no fine-tuning", results.get("no_ft", {}), sd.get("no_ft"))]
    rows += [(n, m, sd.get("methods", {}).get(n)) for n, m in results.get("methods", {}).items()]
    full = results.get("methods", {}).get("full")
    for name, m, s in rows:
        d = lambda k: f"{100 * (m[k] - full[k]):>+14.1f}" if full and name != "full" and k in m else f"{'':>14}"
        js = f"{m['importance_js']:>15.4f}" if "importance_js" in m else f"{'':>15}"
        js2 = m.get("importance_shift_2", {}).get("js")  # the same shift on the second calibration set
        js += f"{js2:>13.4f}" if js2 is not None else f"{'':>13}"
        js += f"{m['importance_js'] / noise:>8.1f}x" if noise and "importance_js" in m else f"{'':>9}"
        tot = m.get("importance_shift", {}).get("total_ratio")  # summed textual importance, x the original's
        tot = f"{tot:>15.1f}x" if tot is not None else ""
        lines.append(f"{name:<16}" + "".join(cell(m, s, k) for k in keys) + f"{d('t2t_acc')}{d('s2t_acc')}{js}{tot}")
    if "importance_noise_js" in results:  # the same original model on a second calibration set
        mean = results.get("importance_noise_js_mean")
        lines.append(f"noise floor (original model, another calibration set): importance JS "
                     f"{results['importance_noise_js']:.4f}"
                     + (f" (over random pairs of sets: mean {mean:.4f}, 90th percentile "
                        f"{results['importance_noise_js_p90']:.4f})" if mean is not None else "")
                     + f", importance sum {results.get('importance_noise_total_ratio', float('nan')):.2f}x")
    return "\n".join(lines)


def format_table1(results, sd=None):
    """The Table 1 analogue from a results.json dict: answer perplexity after zeroing the top / bottom / random 3%
    of the LLM's weights by importance, as a multiple of the unmasked baseline (mean ± sd of the per-seed ratios
    when sd is given); on all test questions and on those the original model answers right from that input."""
    val, sdv = results.get("importance_validation"), (sd or {}).get("importance_validation", {})
    if not val:
        return ""
    lines = ["Table 1 analogue: answer perplexity after zeroing 3% of the LLM's weights by importance (x baseline)",
             f"{'input':<8}{'questions':<10}{'n':>6}{'baseline':>10}{'top 3%':>20}{'bottom 3%':>20}{'random 3%':>20}"]
    cell = lambda m, s, k: f"{m[k]:.3f}x" + (f" ± {s[k]:.3f}" if k in s else "") if k in m else "-"
    for kind, m, s in (("text", val, sdv), ("speech", val.get("speech", {}), sdv.get("speech", {}))):
        for subset, mm, ss in (("all", m, s), ("answered", m.get("answered", {}), s.get("answered", {}))):
            if "baseline_ppl" in mm:
                lines.append(f"{kind:<8}{subset:<10}{mm.get('n_rows', 0):>6.0f}{mm['baseline_ppl']:>10.3f}"
                             + "".join(f"{cell(mm, ss, f'{w}_ratio'):>20}" for w in ("top", "bottom", "random")))
    return "\n".join(lines)


def tradeoff(results, sd=None):
    """Text kept (T2T) against spoken QA gained (S2T) per method, mean ± sd over seeds when sd is given:
    {name: (t2t, t2t_sd, s2t, s2t_sd)}, "no fine-tuning" first."""
    sd = sd or {}
    rows = {"no fine-tuning": (results.get("no_ft", {}), sd.get("no_ft", {}))}
    rows.update({n: (m, sd.get("methods", {}).get(n, {})) for n, m in results.get("methods", {}).items()})
    return {n: (m["t2t_acc"], s.get("t2t_acc", 0.0), m["s2t_acc"], s.get("s2t_acc", 0.0))
            for n, (m, s) in rows.items() if "t2t_acc" in m and "s2t_acc" in m}


def format_tradeoff(results, sd=None):
    points = tradeoff(results, sd)
    base = points.get("no fine-tuning")
    lines = [f"{'trade-off':<16}{'T2T (text kept)':>20}{'S2T (spoken QA)':>20}{'dT2T vs no FT':>15}{'dS2T vs no FT':>15}"
             f"{'ms/step':>9}{'trainable':>14}{'state MB':>10}{'peak MB':>9}"]
    for n, (t, ts, s, ss) in sorted(points.items(), key=lambda kv: -kv[1][0]):
        d = f"{100 * (t - base[0]):>+15.1f}{100 * (s - base[2]):>+15.1f}" if base and n != "no fine-tuning" else ""
        c = results.get("methods", {}).get(n, {})  # its cost: time per step, trainable parameters, peak memory
        cost = "".join(f"{c[k]:>{w}{f}}" if c.get(k) is not None else f"{'':>{w}}"
                       for k, w, f in (("ms_per_step", 9, ".0f"), ("trainable", 14, ",.0f"), ("state_mb", 10, ".1f"),
                                       ("peak_mb", 9, ".0f")))
        lines.append(f"{n:<16}{f'{100 * t:.1f} ± {100 * ts:.1f}':>20}{f'{100 * s:.1f} ± {100 * ss:.1f}':>20}{d:<30}"
                     + (cost if d else ""))
    return "\n".join(lines)


def plot_tradeoff(results, path, sd=None):
    """The trade-off as a scatter with error bars (T2T on x, S2T on y) to a PNG; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, (n, (t, ts, s, ss)) in enumerate(tradeoff(results, sd).items()):  # 10 colours x 4 markers: all distinct
        ax.errorbar(100 * t, 100 * s, xerr=100 * ts, yerr=100 * ss, fmt="osD^"[i // 10 % 4], capsize=3, label=n)
    ax.set_xlabel("T2T accuracy, % (text kept)")
    ax.set_ylabel("S2T accuracy, % (spoken QA)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python evaluate.py RUN_DIR")
    path = os.path.join(sys.argv[1], "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: not found (run python train.py --out {sys.argv[1]} first)")
    with open(path) as f:
        res = json.load(f)
    mean, sd = (res["mean"], res["sd"]) if "mean" in res else (res, None)
    print(format_table(mean, sd) + "\n" + format_table1(mean, sd) + "\n" + format_tradeoff(mean, sd))
