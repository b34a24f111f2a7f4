"""Parameter importance analysis of arXiv 2509.23755 (textual capability degradation in speech LLMs): Taylor importance
(§Importance; also per-sample Taylor, diagonal Fisher), Table 1's masking check, Fig. 2/3's layer-wise distribution and
its shift under fine-tuning (with a noise floor), Fig. 1/4's row/column structure in a matrix, Eq. (3)'s layer-wise
learning rates. Copy this file alone (it imports nothing from the project): any nn.Module with HF-named decoder layers
`model.layers.<i>.…_proj.weight` works, the loss a callable. On a plain LlamaForCausalLM (as the README shows):

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
"""
import re

import torch

KINDS = ("taylor", "taylor_sample", "fisher")
MODULES = ("q", "k", "v", "o", "gate", "up", "down")
BLOCKS = " ▏▎▍▌▋▊▉"  # bar_chart's eighths of a full block █
# [inferred] HF decoder blocks `model.layers.<i>.` (SpeechLLM: `llm.model.…`), not Whisper's `encoder.layers.<i>.`
LAYER_RE = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.")
PROJ_RE = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.(?:.+\.)?(q|k|v|o|gate|up|down)_proj\.(?:base\.)?weight$")

def canonical(name):
    # LoRA keeps the frozen weight at `…q_proj.base.weight`: without `.base`, both models' importances share keys
    return re.sub(r"\.base\.weight$", ".weight", name)

def importance_params(model):
    # [inferred] each decoder layer's 2-D q..down weights: Fig. 2's view is over linears (not embeddings, head, norms)
    return {canonical(n): p for n, p in model.named_parameters() if PROJ_RE.search(n) and p.dim() == 2}

def _layer_module(key):
    m = PROJ_RE.search(key)
    return int(m.group(1)), m.group(2)

# ----------------------------------------------------------------------------- importance over calibration batches
def estimate_importance(model, batches, kind="taylor", loss_fn=None, all_reduce=False, per_batch=None):
    """{canonical key: fp32 tensor like the weight, on its device}: the paper's I_i = |L(θ) - L(θ | θ_i = 0)|
    (§Importance), from g_b = ∂L_b/∂θ over the batches b, L_b = loss_fn(b) (default: model.loss), as
    taylor        |mean_b g_b ⊙ θ| ≈ I
    taylor_sample mean_b |g_b ⊙ θ|: per-sample Taylor with one-sample batches (signs add up, not cancel: >= taylor)
    fisher        mean_b g_b²: the diagonal empirical Fisher, as in EWC
    all_reduce: sum over torch.distributed ranks (call it on the unwrapped module: DDP already averages .grad);
    per_batch (a list; not taylor) gets each batch's estimate summed per layer, for noise_floor."""
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
    """Boolean CPU masks (as imp) on round(frac·N) of all N entries: the most important ("top"), the least ("bottom")
    or random ones (`seed`); an exact top-k on a flat CPU copy (fine up to ~1e8 entries)."""
    if which not in ("top", "bottom", "random"):
        raise ValueError(f"which must be 'top', 'bottom' or 'random', got {which!r}")
    flat = torch.cat([v.detach().flatten().float().cpu() for v in imp.values()])
    k = int(round(frac * flat.numel()))
    idx = flat.topk(k, largest=which == "top").indices if which in ("top", "bottom") else \
        torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool).index_fill_(0, idx, True)
    return {key: m.view(v.shape) for (key, v), m in zip(imp.items(), mask.split([v.numel() for v in imp.values()]))}

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
    def ranks(x):  # 0-based; the `count` ties of a value hold ranks end - count .. end - 1 and share their mean
        _, inv, count = torch.unique(torch.as_tensor(x, dtype=torch.float64).flatten(), return_inverse=True,
                                     return_counts=True)
        return (count.cumsum(0).double() - (count.double() + 1) / 2)[inv]
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
    argmax = lambda d: max(range(len(d)), key=d.__getitem__)
    # total_ratio, not normalised: how much the summed importance grew (the paper's 8B curves drop as a whole, Fig. 3)
    return {"js": js_divergence(p, q), "spearman": spearman(p, q), "argmax_before": argmax(p),
            "argmax_after": argmax(q), "top_jaccard": inter / union if union else 1.0,
            "total_ratio": sum(ln) / max(sum(lo), 1e-30)}

def noise_floor(per_row, n, draws=200, seed=0):
    """[ours] How far the layer distribution moves by chance: JS between the sums of two disjoint random sets of n rows
    of per_row (rows x layers, e.g. per_batch), over `draws` pairs; the mean is the noise floor (one set: one draw)."""
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
    """Fig. 1/4: do |matrix|'s top-frac entries cluster on few rows/columns? row_share (col_share): their fraction in
    the `lines` fullest rows (columns), uniform_share if spread evenly; ratio = mean share / lines (1: no structure)."""
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
    """AdamW groups: layer i's trainable params at lr = initial_lr = base_lr·scales[i], "rest" (embeddings, head,
    adaptor) at base_lr (scales=None: one group "all"); weight_decay > 0 splits each in two, decaying >= 2-D weights."""
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
