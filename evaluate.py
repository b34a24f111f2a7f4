"""
evaluate.py - the paper's measurements: T2T (typed question -> text answer: the text ability kept), S2T (spoken
question -> text answer), ASR WER, answer perplexity (Table 1); the original LLM's importance analysis and each
method's importance shift (Fig. 2/3); the printed tables. Functions take a model and rows, and return numbers.

Right = the normalised gold answer appears as a whole word sequence in the normalised answer ("contains", as the
paper [inferred]) and no other gold answer of the same relation does; exact match (EM) of the answer's first line
is reported beside it. Normaliser: lower-case, non-alphanumerics to spaces, runs of spaces collapsed.

    python evaluate.py runs/default        # the tables of a finished run (or of --seeds: mean ± sd)
"""
import json
import math
import os
import re
import sys

import torch

import importance as imp

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
    """Corpus WER: (substitutions + deletions + insertions) / reference words, summed over the corpus."""
    errors = sum(edit_distance(normalize(r).split(), normalize(h).split()) for r, h in zip(refs, hyps))
    return errors / max(1, sum(len(normalize(r).split()) for r in refs))

def contains(gold, pred):
    return f" {normalize(gold)} " in f" {normalize(pred)} "

def right(rows, preds):
    """Per row: the gold answer is contained in the prediction and no other gold answer of the same relation is
    (rows without a "relation": of any row), so listing candidates ("red blue green ...") never counts, while a real
    LLM's sentence may use common words."""
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
    return [tok.decode(t) for i in range(0, len(rows), batch_size)
            for t in model.generate(make(rows[i:i + batch_size]), max_new_tokens, tok.eos_id)]

def accuracy(model, rows, make, tok):
    """-> (contains-accuracy, exact-match accuracy, predictions)."""
    preds = generate(model, rows, make, tok)
    em = sum(exact(r["answer"], p) for r, p in zip(rows, preds)) / len(rows)
    return sum(right(rows, preds)) / len(rows), em, preds

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
    """Table 2's numbers: T2T and S2T on the test split, WER on asr_test; the same on val as val_* (settings are
    chosen on those, never on test)."""
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
    """importance.estimate_importance over calibration rows: "taylor" in batches of batch_size (the mean gradient does
    not depend on them), the per-sample kinds one row a batch. Under DDP each rank takes every world-th batch and the
    sums are all-reduced: the same result. per_row (a list; not taylor): each row's importance per layer, in order."""
    batch_size = batch_size if kind == "taylor" else 1
    batches = [make(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    mine = [] if per_row is not None else None
    scores = imp.estimate_importance(model, batches[rank::world], kind, all_reduce=world > 1, per_batch=mine)
    if per_row is not None:
        parts = [mine]
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, mine)
        per_row.extend(parts[i % world][i // world] for i in range(len(rows)))  # rank r took rows r, r + world, ...
    return scores

def analyse_original(model, test, calib, calib2, tok, make_text, make_speech, kind, seed=0, batch_size=32, rank=0,
                     world=1):
    """The original LLM's textual importance (transcripts typed) and speech importance (audio) on the calibration
    rows; Table 1 on the test questions, all and those it answers right from that input (where it is wrong it is
    often confidently wrong, and any perturbation lowers that perplexity); the noise floor: the second calibration
    set, and (per-sample kinds) 200 random pairs of disjoint sets of both sets' rows. -> the scores of both sets,
    and the "results" and "report" entries they give""" 
    res, rep, scores = {}, {"distribution": {}, "top5_share": {}}, {}
    per_row = [] if kind != "taylor" else None  # per-sample kinds: each calibration row's textual importance per layer
    for inp, make in (("text", make_text), ("speech", make_speech)):
        answered = [r for r, ok in zip(test, right(test, accuracy(model, test, make, tok)[2])) if ok]
        scores[inp] = importance(model, calib, make, kind, batch_size, rank, world, per_row if inp == "text" else None)
        t1 = {sub: table1_check(model, scores[inp], rows, make, seed) for sub, rows in (("all", test),
                                                                                       ("answered", answered)) if rows}
        rep["distribution"][f"original_{inp}"] = imp.layer_distribution(scores[inp])
        rep["top5_share"][f"original_{inp}"] = imp.top_share_by_layer(scores[inp], 0.05)
        rep[f"table1_{inp}"] = {sub: t1.get(sub) for sub in ("all", "answered")}
        res[inp] = {**t1["all"], "answered": t1.get("answered", {})}
    res = {"importance_validation": {**res["text"], "speech": res["speech"]}}
    scores["text2"] = None
    if len(calib2) == len(calib):  # no noise floor if the pool is too small for two sets
        scores["text2"] = importance(model, calib2, make_text, kind, batch_size, rank, world, per_row)
        rep["noise_floor"] = imp.shift_metrics(scores["text"], scores["text2"])
        res.update(importance_noise_js=rep["noise_floor"]["js"],
                   importance_noise_total_ratio=rep["noise_floor"]["total_ratio"])
        if per_row:  # the two sets are one draw of the noise; random pairs from both sets' rows give its mean
            rep["noise_floor_resampled"] = nf = imp.noise_floor(per_row, len(calib), seed=seed)
            res.update(importance_noise_js_mean=nf["mean"], importance_noise_js_p90=nf["p90"])
    rep["concentration"] = {"original_text": imp.concentration(scores["text"])}  # Fig. 1: rows / columns
    return {"text": scores["text"], "text2": scores["text2"], "results": res, "report": rep}

def table1_check(model, scores, rows, make, seed=0):
    """Table 1: answer perplexity after zeroing the top / bottom / random 3% of the weights by `scores`, and each as
    a multiple of the unmasked baseline."""
    t1 = imp.table1(model, scores, lambda: perplexity(model, rows, make), frac=0.03, seed=seed)
    ratios = {f"{k}_ratio": t1[k] / t1["baseline"] for k in ("top", "bottom", "random")}
    return {**{f"{k}_ppl": v for k, v in t1.items()}, "n_rows": len(rows), **ratios}

def measure_shift(model, w0, original, calib, calib2, make_text, kind, name, batch_size=32, rank=0, world=1):
    """A fine-tuned model's textual importance (of the weights it uses: merge LoRA first) against the original's, on
    both calibration sets (Fig. 2/3), and ΔW's row/column structure (Fig. 4). -> (metrics, report entries)"""
    text = importance(model, calib, make_text, kind, batch_size, rank, world)
    m = {"importance_shift": imp.shift_metrics(original["text"], text)}
    m.update(importance_js=m["importance_shift"]["js"], importance_spearman=m["importance_shift"]["spearman"])
    if original["text2"] is not None:  # the same shift on the second set: does the order of methods hold?
        text2 = importance(model, calib2, make_text, kind, batch_size, rank, world)
        m["importance_shift_2"] = imp.shift_metrics(original["text2"], text2)
    rep = {"distribution": {name: imp.layer_distribution(text)}, "top5_share": {name: imp.top_share_by_layer(text)}}
    dw = {k: v.detach().cpu() - w0[k] for k, v in imp.importance_params(model).items()}  # ΔW (LoRA: BA)
    if any(x.any() for x in dw.values()):  # Fig. 4: does ΔW gather on a few rows/columns too?
        rep["concentration"] = {f"{name}_delta_w": imp.concentration(dw)}
        m["delta_w_concentration"] = rep["concentration"][f"{name}_delta_w"]["all"]["ratio"]
    return m, rep

# -----------------------------------------------------------------------------
# Reporting: Tables 1 and 2, Fig. 2 as terminal bars (+ a PNG with matplotlib), mean ± sd over seeds
def report(results, rep, out=None, sd=None):
    """Print Fig. 2's analogue, Tables 1 and 2 and the trade-off of a results.json dict; figures into `out`."""
    dists = {k: v for k, v in rep["distribution"].items() if k != "original_speech"}
    print("\nLayer-wise textual importance (Fig. 2 analogue):\n" + imp.bar_chart(dists))
    if out and imp.plot_distributions(dists, os.path.join(out, "importance.png")):
        print(f"figure: {os.path.join(out, 'importance.png')}")
    conc = {k: v["all"]["ratio"] for k, v in rep.get("concentration", {}).items()}
    if conc:
        print("top-5% entries on the fullest 5% of rows/cols, x an even spread (Fig. 1/4; 1 = no structure): "
              + ", ".join(f"{k} {v:.1f}" for k, v in conc.items()))
    print("\n".join([format_table(results, sd), format_table1(results, sd), format_tradeoff(results, sd)]))

def mean_sd(runs):
    """Mean and sample sd (n - 1) of every number in a list of results.json dicts (one per seed), nested as they
    are; a number missing from any run is left out."""
    def leaves(d, pre=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(leaves(v, f"{pre}{k}."))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{pre}{k}"] = v
        return out
    flat = [leaves(r) for r in runs]
    mean = {k: sum(f[k] for f in flat) / len(flat) for k in flat[0] if all(k in f for f in flat)}
    sd = {k: (sum((f[k] - mean[k]) ** 2 for f in flat) / max(1, len(flat) - 1)) ** 0.5 for k in mean}
    return nest(mean), nest(sd)

def nest(flat):
    """{"a.b": 1} -> {"a": {"b": 1}}"""
    out = {}
    for k, v in flat.items():
        *path, last = k.split(".")
        d = out
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return out

def format_table(results, sd=None):
    """Table 2's analogue (%, mean ± sd when sd is given): "contains" and EM on the test split, WER, and each method's
    importance shift beside its noise floor. No fine-tuning = the aligned model with the original LLM."""
    sd, noise = sd or {}, results.get("importance_noise_js_mean", results.get("importance_noise_js"))
    cell = lambda m, s, k: f"{100 * m[k]:.1f}" + (f" ± {100 * s[k]:.1f}" if s and k in s else "") if k in m else "-"
    head = ("T2T", "T2T EM", "S2T", "S2T EM", "WER", "dT2T vs full", "dS2T vs full", "importance JS", "JS, 2nd set",
            "x noise", "importance sum")
    lines = [f"{'method':<16}" + "".join(f"{h:>15}" for h in head)]
    rows = [("no fine-tuning", results.get("no_ft", {}), sd.get("no_ft"))]
    rows += [(n, m, sd.get("methods", {}).get(n)) for n, m in results.get("methods", {}).items()]
    full = results.get("methods", {}).get("full")
    for name, m, s in rows:
        d = [f"{100 * (m[k] - full[k]):+.1f}" if full and name != "full" and k in m else "" for k in ("t2t_acc",
                                                                                                     "s2t_acc")]
        js, js2 = m.get("importance_js"), m.get("importance_shift_2", {}).get("js")
        tot = m.get("importance_shift", {}).get("total_ratio")  # summed textual importance, x the original's
        extra = [f"{js:.4f}" if js is not None else "", f"{js2:.4f}" if js2 is not None else "",
                 f"{js / noise:.1f}x" if noise and js is not None else "", f"{tot:.2f}x" if tot is not None else ""]
        lines.append(f"{name:<16}" + "".join(f"{c:>15}" for c in [cell(m, s, k) for k in ("t2t_acc", "t2t_em",
                                                                                          "s2t_acc", "s2t_em", "wer")]
                                             + d + extra))
    if "importance_noise_js" in results:  # the same original model on a second calibration set
        mean = results.get("importance_noise_js_mean")
        lines.append(f"noise floor (original model, another calibration set): importance JS "
                     f"{results['importance_noise_js']:.4f}" + (f" (over random pairs of sets: mean {mean:.4f}, 90th "
                     f"percentile {results['importance_noise_js_p90']:.4f})" if mean is not None else ""))
    return "\n".join(lines)

def format_table1(results, sd=None):
    """Table 1's analogue: answer perplexity after zeroing the top / bottom / random 3% of the LLM's weights by
    importance, x the unmasked baseline; all test questions, and those the original answers right from that input."""
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

def format_tradeoff(results, sd=None):
    """Text kept (T2T) against spoken QA gained (S2T) per method, by text kept, with what a step cost."""
    sd, base = sd or {}, results.get("no_ft", {})
    lines = [f"{'trade-off':<16}{'T2T (text kept)':>18}{'S2T (spoken QA)':>18}{'dT2T vs no FT':>15}"
             f"{'dS2T vs no FT':>15}{'ms/step':>9}{'trainable':>12}{'state MB':>10}"]
    rows = {"no fine-tuning": (base, sd.get("no_ft", {})),
            **{n: (m, sd.get("methods", {}).get(n, {})) for n, m in results.get("methods", {}).items()}}
    for n, (m, s) in sorted(rows.items(), key=lambda kv: -kv[1][0].get("t2t_acc", 0)):
        if "t2t_acc" in m and "s2t_acc" in m:
            pm = lambda k: f"{100 * m[k]:.1f} ± {100 * s.get(k, 0):.1f}"
            d = "".join(f"{100 * (m[k] - base[k]):>+15.1f}" for k in ("t2t_acc", "s2t_acc")) if n in results.get(
                "methods", {}) and "t2t_acc" in base else ""
            cost = "".join(f"{m[k]:>{w},.{p}f}" for k, w, p in (("ms_per_step", 9, 0), ("trainable", 12, 0),
                                                                ("state_mb", 10, 1)) if m.get(k) is not None)
            lines.append(f"{n:<16}{pm('t2t_acc'):>18}{pm('s2t_acc'):>18}{d:<30}{cost}")
    return "\n".join(lines)

def unfinished(res):
    """The stages a results.json lacks: what its run was asked for (planned) and has not measured."""
    return [s for s in ("pretrain", "no_ft") if s not in res] + \
        [m for m in res.get("planned", []) if m not in res.get("methods", {})]

if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python evaluate.py RUN_DIR")
    path = os.path.join(sys.argv[1], "results.json")
    try:
        res = json.load(open(path))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read it ({e}); run python train.py --out {sys.argv[1]} to make or finish it")
    missing = [(f"seed {s}: " if s else "") + ", ".join(unfinished(r)) for s, r in res.get("seeds", {"": res}).items()
               if unfinished(r)]
    if missing:
        raise SystemExit(f"{sys.argv[1]}: an unfinished run, missing {'; '.join(missing)}; rerun its train.py command")
    mean, sd = (res["mean"], res["sd"]) if "mean" in res else (res, None)
    print("\n".join([format_table(mean, sd), format_table1(mean, sd), format_tradeoff(mean, sd)]))
