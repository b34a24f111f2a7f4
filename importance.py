"""
Parameter importance analysis of arXiv 2509.23755 ("Understanding Textual Capability Degradation in Speech LLMs via
Parameter Importance Analysis"): Taylor importance (§Importance; also per-sample Taylor and diagonal Fisher), Table
1's masking check, Fig. 2/3's layer-wise distribution and how far fine-tuning shifts it (with its noise floor), Fig.
1/4's row/column structure inside a matrix, and Eq. (3)'s layer-wise learning rates, the paper's mitigation.

Nothing here imports the project: copy this file alone. Any nn.Module whose decoder layers follow the Hugging Face
naming `model.layers.<i>.…_proj.weight` works, and the loss comes in as a callable. On a plain transformers
LlamaForCausalLM (the README shows these lines; test_all.py runs them):

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from importance import aggregate, bar_chart, estimate_importance, layer_distribution, layer_lr_scale, layer_param_groups
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4))          # or LlamaForCausalLM.from_pretrained(path)
    calib = [torch.randint(0, 128, (4, 32)) for _ in range(3)]            # your calibration batches (token ids)
    imp = estimate_importance(model, calib, loss_fn=lambda ids: model(input_ids=ids, labels=ids).loss)
    print(bar_chart({"original": layer_distribution(imp)}))               # Fig. 2: importance per layer
    scales = layer_lr_scale(aggregate(imp)["layer"], lam=0.4)             # Eq. (3): LR multiplier per layer
    opt = torch.optim.AdamW(layer_param_groups(model.named_parameters(), scales, base_lr=1e-4))

Tests: python -m pytest -q test_all.py -k "importance or taylor or layer_lr or concentration"
"""
import re

import torch

KINDS = ("taylor", "taylor_sample", "fisher")
MODULES = ("q", "k", "v", "o", "gate", "up", "down")
BLOCKS = " ▏▎▍▌▋▊▉"  # bar_chart's eighths of a full block █
# HF decoder-only LMs name their blocks `model.layers.<i>.` (`llm.model.layers.<i>.` inside SpeechLLM); requiring
# the `model.` keeps a HF Whisper encoder's `encoder.layers.<i>.self_attn.q_proj` out. [inferred]
LAYER_RE = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.")
PROJ_RE = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.(?:.+\.)?(q|k|v|o|gate|up|down)_proj\.(?:base\.)?weight$")

def canonical(name):
    # LoRA keeps the frozen weight at `…q_proj.base.weight`: without `.base`, both models' importances share keys
    return re.sub(r"\.base\.weight$", ".weight", name)

def importance_params(model):
    """The 2-D q,k,v,o,gate,up,down weights of every decoder layer. [inferred] Embeddings, norms and the LM head are
    left out: the paper's layer-wise view is over the layers' linears, and a norm weight is a per-channel gain."""
    return {canonical(n): p for n, p in model.named_parameters() if PROJ_RE.search(n) and p.dim() == 2}

def _layer_module(key):
    m = PROJ_RE.search(key)
    return int(m.group(1)), m.group(2)

# ----------------------------------------------------------------------------- importance over calibration batches
def estimate_importance(model, batches, kind="taylor", loss_fn=None, all_reduce=False, per_batch=None):
    """Per-entry importance {canonical key: fp32 tensor shaped like the weight, on the weight's device (no copy to the
    CPU: on a GPU that would cost several times the forward+backward passes)}; loss_fn(batch) defaults to model.loss.
    taylor        |ḡ ⊙ θ|, ḡ = mean_b ∂L_b/∂θ: the paper's I_i = |L(θ) - L(θ | θ_i = 0)| ≈ |∂L/∂θ_i · θ_i|
    taylor_sample mean_b |g_b ⊙ θ|: batches whose gradients disagree in sign add up instead of cancelling (always
                  >= taylor); per-sample Taylor when each batch is one sample (as train.py's analysis passes it)
    fisher        mean_b g_b²: diagonal empirical Fisher as in EWC (per sample, with one-sample batches)
    all_reduce: sum the running sums and batch counts over torch.distributed ranks before the final product (call it
    on the unwrapped module: a DDP wrapper already averages .grad in backward).
    per_batch (a list; not taylor): gets each batch's estimate summed per layer, for `noise_floor` to resample."""
    if kind not in KINDS:
        raise ValueError(f"unknown importance kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if per_batch is not None and kind == "taylor":
        raise ValueError("per_batch needs taylor_sample or fisher: taylor's |mean gradient · θ| is no sum over batches")
    loss_fn, params = loss_fn if loss_fn is not None else model.loss, importance_params(model)
    assert params, "no `model.layers.<i>.…_proj.weight` parameters found"
    grad32 = lambda p: p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
    ids, layer_of = {id(p) for p in params.values()}, {k: _layer_module(k)[0] for k in params}
    device = next(iter(params.values())).device
    saved, was_training, sums, n = [(p, p.requires_grad, p.grad) for p in model.parameters()], model.training, {}, 0
    try:
        model.eval()  # no dropout noise in the gradients
        for p, _, _ in saved:  # only the measured weights need .grad: the rest skip their weight-gradient work
            p.requires_grad_(id(p) in ids)
            p.grad = None
        with torch.enable_grad():
            for batch in batches:
                loss_fn(batch).backward()  # .grad is never zeroed, so for taylor it sums to Σ_b ∂L_b/∂θ
                n += 1
                if kind == "taylor":
                    continue  # nothing per batch: costs one plain forward+backward per batch
                layers = torch.zeros(1 + max(layer_of.values()), dtype=torch.float64, device=device)
                for k, p in params.items():
                    s = (grad32(p) * p.detach().float()).abs() if kind == "taylor_sample" else grad32(p).square()
                    sums[k] = sums[k].add_(s) if k in sums else s
                    if per_batch is not None:  # this batch's estimate summed per layer
                        layers[layer_of[k]] += s.sum(dtype=torch.float64)
                    p.grad = None
                if per_batch is not None:
                    per_batch.append(layers.tolist())  # one device sync per batch
        if kind == "taylor" or n == 0:  # (n = 0: a rank with no batch of its own still joins the all-reduce)
            sums = {k: grad32(p) for k, p in params.items()}  # in the param dtype until here (bf16 models: bf16 sums)
        if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            count = torch.tensor(float(n), device=device)
            for t in [*sums.values(), count]:
                torch.distributed.all_reduce(t)
            n = count.item()
        if n == 0:
            raise ValueError("estimate_importance needs at least one calibration batch")
        if kind == "taylor":  # I_i = |∂L/∂θ_i · θ_i| with the mean gradient over the calibration batches
            return {k: (sums[k] / n).mul_(params[k].detach().float()).abs_() for k in params}
        return {k: sums[k].div_(n) for k in params}  # in place (no second copy of the model): this call's own sums
    finally:
        model.train(was_training)
        for p, flag, g in saved:
            p.requires_grad_(flag)
            p.grad = g

# ----------------------------------------------------------------------------- Fig. 2/3: layer distributions and shifts
def aggregate(imp):
    """Summed importance per matrix, per module type (q..down) and per layer (list, index = layer)."""
    matrix = {k: v.sum(dtype=torch.float64).item() for k, v in imp.items()}
    module, layer = {m: 0.0 for m in MODULES}, [0.0] * (1 + max(_layer_module(k)[0] for k in imp))
    for k, s in matrix.items():
        i, m = _layer_module(k)
        module[m] += s
        layer[i] += s
    return {"matrix": matrix, "module": module, "layer": layer}

def layer_distribution(imp):
    # [inferred] a layer's importance = the sum over its linear weights, normalised to sum 1 over layers
    layer = aggregate(imp)["layer"]
    return [s / sum(layer) for s in layer]

def global_mask(imp, frac, which="top", seed=0):
    """Boolean CPU masks (keys/shapes as imp) on round(frac·N) of all N entries: the most important ("top"), the least
    ("bottom") or random ones (`seed`). Exact top-k on a flat CPU copy: fine up to ~1e8 entries, beyond that a
    threshold estimated on a random sample would do."""
    if which not in ("top", "bottom", "random"):
        raise ValueError(f"which must be 'top', 'bottom' or 'random', got {which!r}")
    keys = list(imp)
    flat = torch.cat([imp[k].detach().flatten().float().cpu() for k in keys])
    k = int(round(frac * flat.numel()))
    idx = flat.topk(k, largest=which == "top").indices if which in ("top", "bottom") else \
        torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool).index_fill_(0, idx, True)
    return {key: m.view(imp[key].shape) for key, m in zip(keys, mask.split([imp[x].numel() for x in keys]))}

def top_share_by_layer(imp, frac=0.05):
    # [inferred] second view of Fig. 2/3: where the globally top-5% parameters live (the masks' layer distribution)
    return layer_distribution(global_mask(imp, frac, "top"))

def js_divergence(p, q):
    """Jensen-Shannon divergence in bits (0: identical, 1: disjoint) of p, q normalised to sum 1; 0·log 0 = 0."""
    p, q = ((t := torch.as_tensor(x, dtype=torch.float64)) / t.sum() for x in (p, q))
    m = (p + q) / 2
    kl_to_m = lambda a: (a[a > 0] * torch.log2(a[a > 0] / m[a > 0])).sum()  # where a > 0, m > 0 too
    return float((0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)).clamp(0.0, 1.0))

def spearman(p, q):
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks; nan if one input is constant."""
    def ranks(x):
        x = torch.as_tensor(x, dtype=torch.float64).flatten()
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
        _, inv = torch.unique(x, return_inverse=True)  # ties share the average of their ranks
        return (torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, r) / torch.bincount(inv))[inv]
    rp, rq = (r - r.mean() for r in (ranks(p), ranks(q)))
    return float(rp @ rq / (rp.norm() * rq.norm()))

def shift_metrics(imp_orig, imp_new, frac=0.05):
    # [inferred] the paper shows the shift only as curves; these put a number on it
    assert imp_orig.keys() == imp_new.keys(), "both importances must have the same canonical keys"
    lo, ln = aggregate(imp_orig)["layer"], aggregate(imp_new)["layer"]  # summed importance per layer
    p, q = [s / sum(lo) for s in lo], [s / sum(ln) for s in ln]          # as layer_distribution
    a, b = global_mask(imp_orig, frac), global_mask(imp_new, frac)
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return {"js": js_divergence(p, q), "spearman": spearman(p, q),
            "argmax_before": max(range(len(p)), key=p.__getitem__),
            "argmax_after": max(range(len(q)), key=q.__getitem__),
            "top_jaccard": inter / union if union else 1.0,
            # not normalised: how much the summed importance grew (the paper's 8B curves drop as a whole, Fig. 3)
            "total_ratio": sum(ln) / max(sum(lo), 1e-30)}

def noise_floor(per_row, n, draws=200, seed=0):
    """How far the layer distribution moves by chance alone [ours]: JS between two disjoint random sets of n rows of
    per_row (rows x layers: estimate_importance's per_batch, one row a batch; summed, as JS normalises), over `draws`
    pairs. A second calibration set is one such draw, maybe far in the tail; the mean is the noise floor."""
    x = torch.as_tensor(per_row, dtype=torch.float64)  # (rows, layers)
    if not 0 < 2 * n <= len(x):
        raise ValueError(f"noise_floor: two disjoint sets of {n} rows need at least {2 * n} rows, got {len(x)}")
    if draws < 1:
        raise ValueError(f"noise_floor: draws must be >= 1, got {draws}")
    gen = torch.Generator().manual_seed(seed)
    perms = (torch.randperm(len(x), generator=gen) for _ in range(draws))
    js = torch.tensor([js_divergence(x[p[:n]].sum(0), x[p[n:2 * n]].sum(0)) for p in perms], dtype=torch.float64)
    return dict(mean=js.mean().item(), median=js.median().item(), p90=js.quantile(0.9).item(), n=n, draws=draws)

# ----------------------------------------------------------------------------- Table 1: does it point at what matters?
def masked_eval(model, imp, frac, which, eval_fn, seed=0):
    """Zero `frac` of the importance params (global_mask's pick), return eval_fn(), restore them even if it raises."""
    params = importance_params(model)
    assert params.keys() == imp.keys(), "importance keys do not match this model's parameters"
    masks, saved = {k: m.to(params[k].device) for k, m in global_mask(imp, frac, which, seed).items()}, {}
    try:
        with torch.no_grad():
            for k, m in masks.items():
                saved[k] = params[k][m].clone()  # only the zeroed entries: a few % of the weights
                params[k][m] = 0
        return eval_fn()
    finally:
        with torch.no_grad():
            for k, vals in saved.items():
                params[k][masks[k]] = vals

def table1(model, imp, eval_fn, frac=0.03, seed=0):
    # Table 1: removing the top 3% should wreck perplexity, the bottom 3% barely move it, random in between
    out = {"baseline": eval_fn()}
    return out | {w: masked_eval(model, imp, frac, w, eval_fn, seed) for w in ("top", "bottom", "random")}

# ----------------------------------------------------------------------------- Fig. 1/4: structure inside one matrix
def _head_share(counts, lines):
    # share of all counts in the fullest `lines` fraction of rows: a Lorenz curve, interpolated (even spread: `lines`)
    c = counts.double().sort(descending=True).values.cumsum(0) / counts.sum()
    c = torch.cat([torch.zeros(1, dtype=torch.float64), c])  # c[j] = share of the fullest j rows
    x = lines * counts.numel()
    i = min(int(x), counts.numel() - 1)
    return float(c[i] + (x - i) * (c[i + 1] - c[i]))

def row_col_concentration(matrix, frac=0.05, lines=0.05):
    """Do the top-frac entries of |matrix| (importance map or ΔW) cluster on few rows and columns? row_share: their
    fraction in the `lines` (5%) of rows holding most of them; col_share: columns; an even spread gives uniform_share
    = lines; ratio = mean share / lines (1 = no structure, 1/lines = all on 5% of the rows and 5% of the columns)."""
    a = matrix.detach().abs().float().cpu()
    idx = a.flatten().topk(max(1, int(round(frac * a.numel())))).indices
    top = torch.zeros(a.numel(), dtype=torch.bool).index_fill_(0, idx, True).view(a.shape)
    row_share, col_share = _head_share(top.sum(1), lines), _head_share(top.sum(0), lines)
    return {"row_share": row_share, "col_share": col_share, "uniform_share": lines,
            "ratio": (row_share + col_share) / (2 * lines)}

def concentration(mats, frac=0.05, lines=0.05):
    """row_col_concentration averaged over matrices ({key: 2-D tensor}), overall and per module type."""
    per = {k: row_col_concentration(m, frac, lines) for k, m in mats.items()}
    mean = lambda ks: {s: sum(per[k][s] for k in ks) / len(ks) for s in ("row_share", "col_share", "ratio")}
    types = sorted({_layer_module(k)[1] for k in per}, key=MODULES.index)
    return {"all": mean(list(per)), **{t: mean([k for k in per if _layer_module(k)[1] == t]) for t in types}}

# ----------------------------------------------------------------------------- Eq. (3): layer-wise learning rates
def layer_lr_scale(layer_importance, lam=0.4):
    """LR multiplier per layer from the original LLM's textual importance: most important -> 1 - lam, least -> 1."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    imp = [float(x) for x in layer_importance]
    lo, hi = min(imp), max(imp)
    # Eq. (3): lr_i = 1 - λ·(I_i - min_j I_j) / (max_j I_j - min_j I_j)
    return [1.0] * len(imp) if hi == lo else [1.0 - lam * (x - lo) / (hi - lo) for x in imp]

def layer_param_groups(named_params, scales, base_lr, weight_decay=0.0):
    """AdamW groups of the trainable params: one per LLM layer i at base_lr·scales[i], and "rest" (embeddings, head,
    final norm, adaptor) at base_lr; scales=None: one group "all". Weight decay goes to >= 2-D weights only, so with
    weight_decay > 0 a group comes as two (same name and lr). A schedule sets lr = initial_lr * its multiplier."""
    trainable = [(n, p) for n, p in named_params if p.requires_grad]
    names = ["all"] if scales is None else [f"layer{i}" for i in range(len(scales))] + ["rest"]
    mults = [1.0] if scales is None else [float(s) for s in scales] + [1.0]
    buckets = {(j, wd): [] for j in range(len(names)) for wd in (weight_decay, 0.0)}  # one per j if wd == 0
    for n, p in trainable:
        m = LAYER_RE.search(n) if scales is not None else None
        j = int(m.group(1)) if m else len(names) - 1
        if m and j >= len(scales):
            raise ValueError(f"{n} is in layer {j} but only {len(scales)} layer scales were given")
        buckets[(j, weight_decay if p.dim() >= 2 else 0.0)].append(p)
    groups = [{"name": names[j], "scale": mults[j], "lr": base_lr * mults[j], "initial_lr": base_lr * mults[j],
               "weight_decay": wd, "params": ps} for (j, wd), ps in buckets.items() if ps]
    seen = [id(p) for g in groups for p in g["params"]]  # minGPT-style: each trainable param in exactly one group
    assert len(seen) == len(set(seen)) and set(seen) == {id(p) for _, p in trainable}, "params not partitioned"
    return groups

# ----------------------------------------------------------------------------- display
def format_lr_table(groups):
    return "\n".join([f"{'group':<8} {'scale':>6} {'lr':>10} {'wd':>6} {'#params':>12}"] + [
        f"{g['name']:<8} {g['scale']:>6.3f} {g['lr']:>10.3e} {g.get('weight_decay', 0.0):>6.3g} "
        f"{sum(p.numel() for p in g['params']):>12,}" for g in groups])

def bar_chart(dists, width=40):
    """Terminal chart of layer distributions: one block per layer, one bar per named distribution."""
    vmax, w, lines = max((v for d in dists.values() for v in d), default=0.0), max(map(len, dists), default=0), []
    for i in range(max(map(len, dists.values()), default=0)):
        for j, (name, d) in enumerate(dists.items()):
            v = d[i] if i < len(d) else 0.0
            eighths = int(round(v / vmax * width * 8)) if vmax > 0 else 0
            bar = "█" * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")
            lines.append(f"{f'layer {i:>2}' if j == 0 else '':<8}  {name:<{w}} {bar:<{width}} {v:.3f}")
    return "\n".join(lines)

def pyplot():  # matplotlib's pyplot drawing to files, or None: the figures are optional
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    plt.switch_backend("Agg")
    return plt

def save_figure(plt, fig, path, dpi=120):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

def plot_distributions(dists, path):
    """Fig. 2/3-style line plot of layer distributions to a PNG; None when matplotlib is not installed."""
    if (plt := pyplot()) is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, d in dists.items():
        ax.plot(range(len(d)), d, marker="o", label=name)
    ax.set(xlabel="layer", ylabel="share of importance")
    ax.legend()
    return save_figure(plt, fig, path)

def plot_shift(runs, path):
    """The shift itself, per layer: each method's share minus the original's (runs: one {name: distribution} per
    seed, with "original_text"); a thin line per seed, the mean bold. -> path, or None without matplotlib."""
    if (plt := pyplot()) is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [k for k in runs[0] if not k.startswith("original")]
    for i, name in enumerate(names):
        diffs = torch.tensor([[a - b for a, b in zip(r[name], r["original_text"])] for r in runs])  # (seeds, layers)
        for d in diffs:
            ax.plot(d.numpy(), color=f"C{i}", lw=0.7, alpha=0.4)
        ax.plot(diffs.mean(0).numpy(), color=f"C{i}", lw=2.2, marker="o", label=name)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(runs[0]["original_text"])))
    ax.set(xlabel="layer", ylabel="share of importance − original's", title=f"the shift ({len(runs)} seed(s))")
    ax.legend()
    return save_figure(plt, fig, path)

def plot_matrices(importance, deltas, path, frac=0.05, title=""):
    """Fig. 1 and 4 as pictures: one matrix's importance with its top-frac entries marked, and each method's |ΔW| on
    the same matrix (deltas: {name: 2-D tensor}). -> path, or None without matplotlib."""
    if (plt := pyplot()) is None:
        return None
    mats = {"original importance": importance, **{f"{n} |ΔW|": d for n, d in deltas.items()}}
    fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats), 3.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats.items()):
        a = m.detach().abs().float().cpu()
        low = a[a > 0].min() if (a > 0).any() else 1e-30
        ax.imshow(a.clamp(min=low).log10().numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        top = a.flatten().topk(max(1, int(round(frac * a.numel())))).indices
        rows, cols = top // a.shape[1], top % a.shape[1]
        ax.scatter(cols.numpy(), rows.numpy(), s=1, c="red", marker="s", linewidths=0, label=f"top {frac:.0%}")
        ax.set(title=name, xlabel="input column", ylabel="output row" if ax is axes[0][0] else None)
    axes[0][0].legend(loc="upper right", markerscale=4, fontsize=7)
    fig.suptitle(f"{title}: log10 |value|; red: the top {frac:.0%} of each", fontsize=9)
    return save_figure(plt, fig, path, dpi=80)
