# The noise diagnostic behind RESULTS.md "The default v8" (session 10): per-row gradients of a run's original LLM on
# the 512 fine-tuning rows typed, then the JS between the layer distributions of 8 random halvings, with the mean
# gradient (taylor) and per sample. Run from the repo root: python results/v8-selection/noise_diagnostic.py RUN
import sys, random, torch, json
sys.path.insert(0, ".")
import train, data, importance as imp
from model import ModelConfig, SpeechLLM, load_checkpoint
run = sys.argv[1]
args = train.get_args(["--out", run, "--data-dir", "runs/data/formant-e128-s0-v4"])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
torch.manual_seed(0)
m = SpeechLLM(ModelConfig())
m.load_state_dict(load_checkpoint(run + "/pretrain.pt")["model"], strict=False)
m.eval()
pool = data.finetune_rows(d.rows)
params = imp.importance_params(m)
for p in m.parameters(): p.requires_grad_(False)
for p in params.values(): p.requires_grad_(True)
# per-row loss and per-row layer-level gradient vectors (chunk sums)
losses, G = [], []
for r in pool:
    b = d.text_batch([r])
    l = m.loss(b)
    l.backward()
    losses.append(l.item())
    G.append(torch.cat([p.grad.flatten() for p in params.values()]).clone())
    for p in params.values(): p.grad = None
G = torch.stack(G)  # (N, P)
theta = torch.cat([p.detach().flatten() for p in params.values()])
sizes = [p.numel() for p in params.values()]
layer_of = torch.cat([torch.full((n,), imp._layer_module(k)[0]) for k, n in zip(params, sizes)])
L = int(layer_of.max()) + 1
losses = torch.tensor(losses)
print("loss quantiles", [round(losses.quantile(q).item(), 3) for q in (0.1, 0.5, 0.75, 0.9, 0.99)], "mean", losses.mean().item())
def dist(v):
    s = torch.zeros(L).index_add_(0, layer_of, v)
    return s / s.sum()
def js(p, q):
    mm = (p + q) / 2
    kl = lambda a, b: (a * (a / b).log()).sum()
    return (0.5 * kl(p, mm) + 0.5 * kl(q, mm)).item()
def taylor(idx): return (G[idx].mean(0) * theta).abs()
def sample(idx): return (G[idx] * theta).abs().mean(0)
N = len(pool)
for name, f in (("taylor", taylor), ("per-sample", sample)):
    out = []
    for k in range(8):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(k))
        out.append(js(dist(f(perm[:N // 2])), dist(f(perm[N // 2:]))))
    print(name, "noise JS over 8 random halvings", [round(x, 5) for x in out])
    print(name, "dist (all rows)", [round(x, 3) for x in dist(f(torch.arange(N))).tolist()])
# share of |mean gradient| from the 10% highest-loss rows
top = losses.argsort(descending=True)[: N // 10]
print("share of sum|g_i theta| from top-10% loss rows", ((G[top] * theta).abs().sum() / (G * theta).abs().sum()).item())
