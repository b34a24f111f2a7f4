"""
evaluate.py - the paper's measurements: T2T (typed question -> text answer: the text kept), S2T (spoken), WER, Table
1, the original's importance and each method's shift (Fig. 2/3); then our controls, each its own call, and the tables.

    python evaluate.py runs/default        # the tables of a finished run (or of --seeds: mean ± sd)
"""
import json, math, os, random, re, sys, unicodedata

import torch
from torchaudio.functional import edit_distance  # Levenshtein distance of two word lists

import importance as imp
from rundir import load_checkpoint, save_checkpoint

def normalize(text):
    """Any language: NFKC, casefolded, punctuation and symbols -> spaces; letters of every script and their accents
    kept (café is not cafe; folding accents would also strip Japanese dakuten), digits kept."""
    return " ".join(re.sub(r"[\W_]", " ", unicodedata.normalize("NFKC", text).casefold()).split())

def unspaced(text):  # written without spaces between words (Chinese, Japanese): scored by characters
    return any(unicodedata.east_asian_width(c) in "WF" and c.isalpha() for c in text)

def words(text):  # WER's units: words, or characters where the text has no spaces
    t = normalize(text)
    return list(t.replace(" ", "")) if unspaced(t) else t.split()

def wer(refs, hyps):  # corpus WER: (substitutions + deletions + insertions) / reference words (or characters)
    errors = sum(edit_distance(words(r), words(h)) for r, h in zip(refs, hyps))  # S + D + I
    return errors / max(1, sum(len(words(r)) for r in refs))

def contains(gold, pred):  # the gold answer as whole words of the prediction (unspaced scripts: as a substring)
    g, p = normalize(gold), normalize(pred)
    return bool(g) and (g in p if unspaced(g) else f" {g} " in f" {p} ")

def right(rows, preds):
    """Right, per row (as the paper, "contained" [inferred]): the gold answer is in the prediction and no other gold
    answer of its relation is, so listing candidates ("red blue green ...") never counts; a sentence may."""
    golds = {}
    for r in rows:
        golds.setdefault(r.get("relation"), set()).add(normalize(r["answer"]))
    def others(r):  # the relation's other gold answers, but not those inside this one ("york" in "new york")
        return [o for o in golds[r.get("relation")] if o != normalize(r["answer"]) and not contains(o, r["answer"])]
    return [contains(r["answer"], p) and not any(contains(o, p) for o in others(r)) for r, p in zip(rows, preds)]

def exact(gold, pred):  # normalised exact match of the first line (an instruct LLM may add a sentence below)
    return bool(normalize(gold)) and normalize(gold) == normalize(pred.strip().split("\n")[0])

@torch.no_grad()
def generate(model, rows, make, tok, max_new_tokens=None, ctc=False, batch_size=256, cut=None):
    """Greedy answers (to tok.answer_tokens), make: rows -> a typed or spoken batch; ctc: the greedy CTC transcripts
    (what the LLM reads). cut (a list): gets, per row, whether the answer ran out of tokens before its EOS."""
    model.eval()
    n = max_new_tokens or tok.answer_tokens
    run = lambda b: model.ctc_transcribe(b) if ctc else model.generate(b, n, tok.eos_id)
    ids = [t for i in range(0, len(rows), batch_size) for t in run(make(rows[i:i + batch_size]))]
    if cut is not None: cut.extend(len(t) == n for t in ids)  # generate drops the EOS: n tokens = none
    return [tok.decode(t) for t in ids]

def accuracy(model, rows, make, tok):  # -> (contains-accuracy, exact-match accuracy, predictions, share cut)
    cut = []
    preds = generate(model, rows, make, tok, cut=cut)
    em = sum(exact(r["answer"], p) for r, p in zip(rows, preds)) / len(rows)
    return sum(right(rows, preds)) / len(rows), em, preds, sum(cut) / len(rows)

@torch.no_grad()
def perplexity(model, rows, make, batch_size=64):  # exp(mean cross-entropy of the answer tokens + EOS), all rows
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = make(rows[i:i + batch_size])
        nll += model.loss(batch, reduction="sum").item()
        n += sum(len(a) for a in batch["answers"])
    return math.exp(min(nll / n, 700))

@torch.no_grad()
def ctc_loss(model, rows, make, batch_size=64):  # the rows' mean CTC loss (align's held-out check)
    model.eval()
    return sum(len(rows[i:i + batch_size]) * model.loss(make(rows[i:i + batch_size]), ctc_weight=1.0, ctc_only=True
                                                         ).item() for i in range(0, len(rows), batch_size)) / len(rows)

def chance(rows):  # the best constant answer per relation's accuracy: what a model that cannot hear scores
    by = {}
    for r in rows:
        by.setdefault(r.get("relation"), []).append(normalize(r["answer"]))
    return sum(max(map(a.count, set(a))) for a in by.values()) / max(1, len(rows))

def heard(model, qs, make_speech, tok, ok):
    """What the LLM reads: the CTC transcripts' WER, and S2T (ok: per row) split by whether the entity's name is in it."""
    hyps = generate(model, qs, make_speech, tok, ctc=True)
    out = {"ctc_wer": wer([r["transcript"] for r in qs], hyps)}
    if all("entity" in r for r in qs):
        hit = [contains(r["entity"], h) for r, h in zip(qs, hyps)]
        out["name_heard"] = sum(hit) / len(qs)
        for k, want in (("s2t_acc_name_heard", True), ("s2t_acc_name_missed", False)):
            if want in hit:
                out[k] = sum(o for o, h in zip(ok, hit) if h == want) / hit.count(want)
    return out

def evaluate_all(model, rows, tok, make_text, make_speech):
    """T2T, S2T (and what the LLM reads: heard) on test, and on val as val_* (settings are chosen on val, never on
    test); WER on asr_test."""
    out = {}
    for split, pre in (("test", ""), ("val", "val_")):
        qs = [r for r in rows if r["split"] == split]
        if qs:
            out[pre + "t2t_acc"], out[pre + "t2t_em"], _, out[pre + "t2t_cut"] = accuracy(model, qs, make_text, tok)
            out[pre + "s2t_acc"], out[pre + "s2t_em"], preds, out[pre + "s2t_cut"] = accuracy(model, qs, make_speech, tok)
            if model.cfg.ctc_compress:
                out.update({pre + k: v for k, v in heard(model, qs, make_speech, tok, right(qs, preds)).items()})
    asr = [r for r in rows if r["split"] == "asr_test"]
    if asr:  # a manifest without an asr_test split gets no WER
        out["wer"] = wer([r["transcript"] for r in asr], generate(model, asr, make_speech, tok, max_new_tokens=32))
    return out

def importance(model, rows, make, kind="taylor", batch_size=32, per_row=None):
    """estimate_importance over rows: "taylor" in batches (its mean gradient does not depend on them), the per-sample
    kinds one row a batch; under DDP (torchrun) each rank takes every world-th batch, the sums all-reduced. per_row (a
    list; not taylor): gets each row's importance per layer, in row order."""
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    batch_size = batch_size if kind == "taylor" else 1
    batches = [make(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    mine = [] if per_row is not None else None
    scores = imp.estimate_importance(model, batches[rank::world], kind, all_reduce=world > 1, per_batch=mine)
    if per_row is not None:
        parts = [None] * world if world > 1 else [mine]
        torch.distributed.all_gather_object(parts, mine) if world > 1 else None
        per_row.extend(parts[i % world][i // world] for i in range(len(rows)))  # rank r took rows r, r + world, ...
    return scores

def analyse_original(model, d, kind, seed=0, batch_size=32, per_row=None):
    """The original LLM's textual (transcripts typed) and speech importance on the calibration rows, Fig. 1/2, and
    Table 1 on 400 test questions, all and those it answers right (a wrong answer's perplexity falls under any
    perturbation). per_row (a list): gets each calibration row's textual importance per layer. -> scores, entries"""
    res, rep, scores = {}, {"distribution": {}, "top5_share": {}}, {}
    test = d.split("test")
    test = [test[i] for i in sorted(random.Random(0).sample(range(len(test)), min(len(test), 400)))]  # Table 1's
    for inp, make in (("text", d.text_batch), ("speech", d.ft_batch)):
        answered = [r for r, ok in zip(test, right(test, accuracy(model, test, make, d.tok)[2])) if ok]
        scores[inp] = importance(model, d.calib, make, kind, batch_size, per_row if inp == "text" else None)
        t1 = {sub: table1_check(model, scores[inp], rows, make, seed) for sub, rows in (("all", test),
                                                                                       ("answered", answered)) if rows}
        rep["distribution"][f"original_{inp}"] = imp.layer_distribution(scores[inp])
        rep["top5_share"][f"original_{inp}"] = imp.top_share_by_layer(scores[inp], 0.05)
        rep[f"table1_{inp}"] = {sub: t1.get(sub) for sub in ("all", "answered")}
        res[inp] = {**t1["all"], "answered": t1.get("answered", {})}
    rep["concentration"] = {"original_text": imp.concentration(scores["text"])}  # Fig. 1: rows / columns
    return {**scores, "results": {"importance_validation": {**res["text"], "speech": res["speech"]}}, "report": rep}

def table1_check(model, scores, rows, make, seed=0):
    """Table 1: answer perplexity after zeroing the top / bottom / random 3% of the weights by `scores`, x baseline."""
    t1 = imp.table1(model, scores, lambda: perplexity(model, rows, make), frac=0.03, seed=seed)
    ratios = {f"{k}_ratio": t1[k] / t1["baseline"] for k in ("top", "bottom", "random")}
    return {**{f"{k}_ppl": v for k, v in t1.items()}, "n_rows": len(rows), **ratios}

def measure_shift(model, w0, original, d, kind, name, batch_size=32):
    """Fig. 2/3: the used weights' textual importance (LoRA merged) against the original's; Fig. 4: ΔW's structure."""
    text = importance(model, d.calib, d.text_batch, kind, batch_size)
    m = {"importance_shift": imp.shift_metrics(original["text"], text)}
    m.update(importance_js=m["importance_shift"]["js"], importance_spearman=m["importance_shift"]["spearman"])
    rep = {"distribution": {name: imp.layer_distribution(text)}, "top5_share": {name: imp.top_share_by_layer(text)}}
    dw = {k: v.detach().cpu() - w0[k] for k, v in imp.importance_params(model).items()}  # ΔW (LoRA: BA)
    if any(x.any() for x in dw.values()):  # Fig. 4: does ΔW gather on a few rows/columns too?
        rep["concentration"] = {f"{name}_delta_w": imp.concentration(dw)}
        m["delta_w_concentration"] = rep["concentration"][f"{name}_delta_w"]["all"]["ratio"]
    return m, rep

# -----------------------------------------------------------------------------
# Our controls, each its own call: the noise floor, the style control (and the seed spread: js_between_seeds)
def own_answers(model, rows, make, tok, max_new_tokens=48, cut=None):  # the style control's targets: its answers
    answers = generate(model, rows, make, tok, max_new_tokens, cut=cut)  # each model in its own style
    return [{**r, "target": a.strip()} for r, a in zip(rows, answers)]

def own_importance(model, d, kind, batch_size=32, rows=None):  # the style control: importance on its own answers
    return importance(model, own_answers(model, rows or d.calib, d.text_batch, d.tok), d.text_batch, kind, batch_size)

def original_controls(model, d, original, kind, seed=0, batch_size=32, per_row=None):
    """The noise floor (the original on a second calibration set; per-sample kinds: over 200 random pairs of sets of
    both sets' rows, per_row) and the style control (importance on its own greedy answers, with its noise)."""
    res, rep, two = original["results"], original["report"], len(d.calib2) == len(d.calib)  # else too few rows
    original["text2"] = importance(model, d.calib2, d.text_batch, kind, batch_size, per_row) if two else None
    if two:
        rep["noise_floor"] = nf = imp.shift_metrics(original["text"], original["text2"])
        res.update(importance_noise_js=nf["js"], importance_noise_total_ratio=nf["total_ratio"])
    if two and per_row:  # the two sets are one draw of the noise; random pairs from both sets' rows give its mean
        rep["noise_floor_resampled"] = nf = imp.noise_floor(per_row, len(d.calib), seed=seed)
        res.update(importance_noise_js_mean=nf["mean"], importance_noise_js_p90=nf["p90"])
    original["own"] = own_importance(model, d, kind, batch_size)
    rep["distribution_own"] = {"original": imp.layer_distribution(original["own"])}
    if two:
        own2 = own_importance(model, d, kind, batch_size, d.calib2)
        res["importance_noise_js_own"] = imp.shift_metrics(original["own"], own2)["js"]
    return original

def shift_controls(model, original, d, kind, name, batch_size=32):
    """The shift on the 2nd calibration set (does the order of methods hold?) and on each model's own answers."""
    m, rep, text2 = {}, {}, original.get("text2")
    if text2 is not None:
        m["importance_shift_2"] = imp.shift_metrics(text2, importance(model, d.calib2, d.text_batch, kind, batch_size))
    if original.get("own") is not None:
        own = own_importance(model, d, kind, batch_size)
        m["importance_shift_own"] = imp.shift_metrics(original["own"], own)
        rep["distribution_own"] = {name: imp.layer_distribution(own)}
    return m, rep

def save_matrices(path, original, name, weights, w0):
    """Fig. 1/4's pictures' data [ours]: the original's most important matrix and each method's ΔW there."""
    key = max(original, key=lambda k: original[k].sum())
    mats = load_checkpoint(path) if os.path.exists(path) else {"key": key, "importance": original[key], "delta_w": {}}
    mats["delta_w"][name] = weights[key].detach().cpu() - w0[key]
    save_checkpoint(path, mats)

# -----------------------------------------------------------------------------
# Reporting: Tables 1 and 2, Fig. 2 as terminal bars, mean ± sd over seeds; Fig. 1-4 as PNGs (matplotlib)
def report(results, rep, out=None, sd=None, runs=None):
    """Print Fig. 2's analogue, Tables 2 and 1; the figures into `out` (runs: each seed's distributions)."""
    dists = {k: v for k, v in rep["distribution"].items() if k != "original_speech"}
    print("\nLayer-wise textual importance (Fig. 2 analogue):\n" + imp.bar_chart(dists))
    mats = out and os.path.exists(os.path.join(out, "matrices.pt")) and load_checkpoint(os.path.join(out, "matrices.pt"))
    for fig in (out and plot_shift(runs or [dists], os.path.join(out, "shift.png")), mats and plot_matrices(
            mats["importance"], mats["delta_w"], os.path.join(out, "matrices.png"), title=mats["key"])):
        print(f"figure: {fig}" if fig else "", end="\n" if fig else "")
    if conc := {k: v["all"]["ratio"] for k, v in rep.get("concentration", {}).items()}:
        print("top-5% entries on the fullest 5% of rows/cols, x an even spread (Fig. 1/4; 1 = no structure): "
              + ", ".join(f"{k} {v:.1f}" for k, v in conc.items()))
    print(format_table(results, sd) + "\n" + format_table1(results, sd))

def js_between_seeds(runs, names):
    """R4's null [ours]: the mean JS between one method's layer distributions over all pairs of seeds' runs."""
    pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    return {k: sum(imp.js_divergence(a[k], b[k]) for a, b in pairs) / len(pairs) for k in names} if pairs else {}

def mean_sd(runs):
    """Mean and sample sd (n - 1) of every number in results.json dicts (one per seed); one missing in any: left out."""
    mean, sd = {}, {}
    for k in runs[0]:
        vs = [r.get(k) for r in runs]
        if all(isinstance(x, dict) for x in vs):
            mean[k], sd[k] = mean_sd(vs)
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vs):
            mean[k] = sum(vs) / len(vs)
            sd[k] = (sum((x - mean[k]) ** 2 for x in vs) / max(1, len(vs) - 1)) ** 0.5
    return mean, sd

def format_table(results, sd=None):
    """Table 2's analogue (%, ± sd over seeds), chance and a step's cost; then each method's importance shift (Fig.
    2/3 as numbers): JS, on the 2nd set, x the noise floor, summed (x the original's), with style held fixed."""
    sd, base = sd or {}, results.get("no_ft", {})
    noise, own_noise = results.get("importance_noise_js_mean", results.get("importance_noise_js")), results.get(
        "importance_noise_js_own")
    runs = [("no fine-tuning", base, sd.get("no_ft") or {})] + [(n, m, sd.get("methods", {}).get(n, {}))
                                                                for n, m in results.get("methods", {}).items()]
    row = lambda name, *cells: f"{name:<16}" + "".join(f"{c:>15}" for c in cells)
    keys = ("t2t_acc", "s2t_acc", "t2t_em", "s2t_em", "wer", "ctc_wer")
    lines = [row("method", "T2T", "S2T", "T2T EM", "S2T EM", "WER", "CTC WER", "S2T name heard", "dT2T vs no FT",
                 "dS2T vs no FT", "ms/step", "trainable")]
    for name, m, s in runs:
        cells = [f"{100 * m[k]:.1f}" + (f" ± {100 * s[k]:.1f}" if k in s else "") if k in m else "-" for k in keys]
        cells.append("/".join(f"{100 * m[k]:.0f}" if k in m else "-" for k in ("s2t_acc_name_heard",
                                                                                "s2t_acc_name_missed")))
        cells += [f"{100 * (m[k] - base[k]):+.1f}" if m is not base and k in base else "" for k in keys[:2]]
        lines.append(row(name, *cells, *[f"{m[k]:,.0f}" if k in m else "" for k in ("ms_per_step", "trainable")]))
    if "s2t_chance" in results:
        lines.append(f"chance (the best constant answer per relation): {100 * results['s2t_chance']:.1f}; S2T name "
                     "heard: on the questions whose entity's name is in the CTC transcript / on the others")
    if "whisper_wer" in results:  # real.py's reference for the CTC WER: the encoder's own decoder, same audio
        lines.append(f"Whisper's own WER on {results['whisper_wer_n']:.0f} of these spoken test questions: "
                     f"{100 * results['whisper_wer']:.1f} (the CTC WER's reference)")
    if cut := [f"{n} {100 * m['t2t_cut']:.0f}/{100 * m['s2t_cut']:.0f}" for n, m, _ in runs if "t2t_cut" in m]:
        lines.append("answers without EOS within the token limit, % T2T/S2T: " + ", ".join(cut))
    lines.append(row("importance", "importance JS", "JS, 2nd set", "x noise", "importance sum", "JS own answers"))
    for name, m, _ in runs[1:]:
        js, own = m.get("importance_js"), m.get("importance_shift_own", {}).get("js")
        cells = [f"{js:.4f}" if js is not None else "", f"{m['importance_shift_2']['js']:.4f}" if
                 "importance_shift_2" in m else "", f"{js / noise:.1f}x" if noise and js is not None else ""]
        cells.append(f"{m['importance_shift']['total_ratio']:.2f}x" if "importance_shift" in m else "")
        lines.append(row(name, *cells, f"{own:.4f} {own / own_noise:.0f}x" if own is not None and own_noise else ""))
    if "importance_noise_js" in results:  # the same original model on a second calibration set
        mean = results.get("importance_noise_js_mean")
        lines.append(f"noise floor (the original on another calibration set): JS {results['importance_noise_js']:.4f}"
                     + (f" (random pairs of sets: mean {mean:.4f}, 90th percentile "
                        f"{results['importance_noise_js_p90']:.4f})" if mean is not None else ""))
    return "\n".join(lines)

def format_table1(results, sd=None):
    """Table 1's analogue, x the unmasked baseline: all test questions, and those the original answers right."""
    val, sdv = results.get("importance_validation") or {}, (sd or {}).get("importance_validation", {})
    lines = ["Table 1 analogue: answer perplexity after zeroing 3% of the LLM's weights by importance (x baseline)",
             f"{'input':<8}{'questions':<10}{'n':>6}{'baseline':>10}{'top 3%':>20}{'bottom 3%':>20}{'random 3%':>20}"]
    cell = lambda m, s, k: f"{m[k]:.3f}x" + (f" ± {s[k]:.3f}" if k in s else "") if k in m else "-"
    for kind, m, s in (("text", val, sdv), ("speech", val.get("speech", {}), sdv.get("speech", {}))):
        for sub, mm, ss in (("all", m, s), ("answered", m.get("answered", {}), s.get("answered", {}))):
            if "baseline_ppl" in mm:
                lines.append(f"{kind:<8}{sub:<10}{mm.get('n_rows', 0):>6.0f}{mm['baseline_ppl']:>10.3f}" + "".join(
                    f" {cell(mm, ss, f'{w}_ratio'):>19}" for w in ("top", "bottom", "random")))
    return "\n".join(lines) * bool(val)

def _figure(figsize):  # a matplotlib Figure without pyplot (no global state, nothing to close), or None: no matplotlib
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=figsize, layout="tight")

def plot_shift(runs, path):
    """Fig. 2/3 to a PNG (runs: a {name: layer distribution} per seed, with "original_text"). Left, each distribution
    (mean over seeds); right, the shift: each share minus the original's, a thin line per seed, the mean bold."""
    if (fig := _figure((11, 3.5))) is None:
        return None
    left, right = fig.subplots(1, 2)
    orig = torch.tensor([r["original_text"] for r in runs], dtype=torch.float64)  # (seeds, layers)
    for i, name in enumerate(["original_text"] + [k for k in runs[0] if not k.startswith("original")]):
        dist = torch.tensor([r[name] for r in runs], dtype=torch.float64)  # (seeds, layers)
        left.plot(dist.mean(0).numpy(), color=f"C{i}", marker="o", label=name)
        for row in dist - orig:  # the shift (the original's own: the zero line)
            right.plot(row.numpy(), color=f"C{i}", lw=0.7, alpha=0.4)
        right.plot((dist - orig).mean(0).numpy(), color=f"C{i}", lw=2.2, marker="o", label=name)
    left.set(ylabel="share of importance", title=f"layer distributions (mean of {len(runs)} seed(s))")
    right.set(ylabel="share of importance − original's", title=f"the shift ({len(runs)} seed(s))")
    for ax in (left, right):
        ax.set(xlabel="layer", xticks=range(orig.shape[1]))
        ax.legend()
    fig.savefig(path, dpi=120)
    return path

def plot_matrices(importance, deltas, path, frac=0.05, title=""):
    """Fig. 1 and 4 as pictures: one matrix's importance with its top-frac entries marked, and each method's |ΔW| on
    the same matrix (deltas: {name: 2-D tensor}). -> path, or None without matplotlib."""
    mats = {"original importance": importance, **{f"{n} |ΔW|": d for n, d in deltas.items()}}
    if (fig := _figure((3.2 * len(mats), 3.4))) is None:
        return None
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    for ax, (name, m) in zip(axes, mats.items()):
        a = m.detach().abs().float().cpu()
        low = a[a > 0].min() if (a > 0).any() else 1e-30
        ax.imshow(a.clamp(min=low).log10().numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        top = a.flatten().topk(max(1, int(round(frac * a.numel())))).indices
        rows, cols = top // a.shape[1], top % a.shape[1]
        ax.scatter(cols.numpy(), rows.numpy(), s=1, c="red", marker="s", linewidths=0, label=f"top {frac:.0%}")
        ax.set(title=name, xlabel="input column", ylabel="output row" if ax is axes[0] else None)
    axes[0].legend(loc="upper right", markerscale=4, fontsize=7)
    fig.suptitle(f"{title}: log10 |value|; red: the top {frac:.0%} of each", fontsize=9)
    fig.savefig(path, dpi=80)
    return path

if __name__ == "__main__":
    path = os.path.join(sys.argv[-1], "results.json")
    try:
        res = json.load(open(path)) if len(sys.argv) == 2 else sys.exit("usage: python evaluate.py RUN_DIR")
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read it ({e}); run python train.py --out {sys.argv[1]} to make or finish it")
    lack = lambda r: [s for s in ("pretrain", "no_ft") if s not in r] + sorted(set(r.get("planned", [])) - set(
        r.get("methods", {})))  # asked for, not measured
    if missing := [f"seed {s}: " * bool(s) + ", ".join(lack(r)) for s, r in res.get("seeds", {"": res}).items() if lack(r)]:
        raise SystemExit(f"{sys.argv[1]}: an unfinished run, missing {'; '.join(missing)}; rerun its train.py command")
    mean, sd = (res["mean"], res["sd"]) if "mean" in res else (res, None)
    print(format_table(mean, sd) + "\n" + format_table1(mean, sd))
