# The row-level noise diagnostic behind RESULTS.md "The default v9" (session 11): each fine-tuning row's per-sample
# Taylor importance summed per layer, for a run's original LLM and one fine-tuned model; then the noise JS between
# two disjoint random sets of n rows (20 draws) and the shift on the same rows, for n = 64, 128, 256. JS in nats
# here (the pipeline reports bits, 1.443x these). Run from the repo root with the v4 world built:
#   python results/v9-selection/row_noise.py RUN [ft_full]   (writes RUN/rowdiag_<ft>.pt)
import sys, random, torch, json
sys.path.insert(0, ".")
import train, data, importance as imp
from model import ModelConfig, SpeechLLM, load_checkpoint
run = sys.argv[1]; ft = sys.argv[2] if len(sys.argv) > 2 else "ft_full"
torch.set_num_threads(1)
args = train.get_args(["--out", run, "--data-dir", "runs/data/formant-e128-s0-v4"])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
pool = data.finetune_rows(d.rows)
def rowvecs(states):
    torch.manual_seed(0)
    m = SpeechLLM(ModelConfig())
    for s in states: m.load_state_dict(load_checkpoint(run + f"/{s}.pt")["model"], strict=False)
    m.eval()
    params = imp.importance_params(m)
    for p in m.parameters(): p.requires_grad_(False)
    for p in params.values(): p.requires_grad_(True)
    lay = {k: imp._layer_module(k)[0] for k in params}
    L = max(lay.values()) + 1
    V, losses = [], []
    for r in pool:
        l = m.loss(d.text_batch([r])); l.backward(); losses.append(l.item())
        v = torch.zeros(L)
        for k, p in params.items():
            v[lay[k]] += (p.grad * p.detach()).abs().sum(); p.grad = None
        V.append(v)
    return torch.stack(V), torch.tensor(losses)
V0, l0 = rowvecs(["pretrain"]); V1, l1 = rowvecs(["pretrain", ft])
torch.save(dict(V0=V0, V1=V1, l0=l0, l1=l1), run + f"/rowdiag_{ft}.pt")
def js(p, q):
    p, q = p / p.sum(), q / q.sum(); mm = (p + q) / 2
    kl = lambda a, b: (a * (a / b).log()).sum()
    return (0.5 * kl(p, mm) + 0.5 * kl(q, mm)).item()
N = len(pool); print("N", N, "loss0 q", [round(l0.quantile(q).item(), 3) for q in (.5, .75, .9, .99)], "loss1 q", [round(l1.quantile(q).item(), 3) for q in (.5, .75, .9, .99)])
print("dist0", [round(x, 3) for x in (V0.sum(0) / V0.sum()).tolist()])
print("dist1", [round(x, 3) for x in (V1.sum(0) / V1.sum()).tolist()])
for n in (64, 128, 256):
    nz, sh = [], []
    for k in range(20):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(k))
        a, b = perm[:n], perm[n:2 * n]
        nz.append(js(V0[a].sum(0), V0[b].sum(0))); sh.append(js(V0[a].sum(0), V1[a].sum(0)))
    nz, sh = torch.tensor(nz), torch.tensor(sh)
    print(n, "noise mean %.5f med %.5f" % (nz.mean(), nz.median()), "shift mean %.5f med %.5f" % (sh.mean(), sh.median()), "ratio %.1f" % (sh.mean() / nz.mean()))
print("all-rows shift %.5f" % js(V0.sum(0), V1.sum(0)))
