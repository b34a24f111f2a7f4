# The EMA probe behind RESULTS.md "The default v11" (session 13), run before any pipeline with EMA weights:
#   python results/v11-selection/ema_probe.py SEED   (seeds 50-51; appends to results/v11-selection/ema_probe.jsonl)
# One pretraining pass per seed (the same 1500-step cosine plan as v10's), with exponential moving averages of the
# weights at several decays beside the raw weights. Every 25 steps: T2T on pretrain_val of the raw and of each EMA;
# at the first check where an EMA reaches a target, that EMA's T2T on val too (test not read: this chooses the decay)
import os, sys, json, time, copy, torch
sys.path.insert(0, ".")
import train, evaluate
from model import ModelConfig, SpeechLLM
torch.set_num_threads(1)
seed = int(sys.argv[1])
betas, targets = [0.99, 0.995, 0.998], [0.6, 0.7, 0.74, 0.8]
args = train.get_args(["--out", "/tmp/exp/x", "--data-dir", "runs/data/formant-e128-s0-v5", "--seed", str(seed)])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
torch.manual_seed(seed)
m = SpeechLLM(ModelConfig())
train.set_trainable(m, ["llm."])
params = [p for p in m.parameters() if p.requires_grad]
emas = {b: [p.detach().clone() for p in params] for b in betas}
avg = copy.deepcopy(m)  # the EMA weights are copied in here to be evaluated
acc = lambda mm, s: round(100 * evaluate.accuracy(mm, d.split(s), d.text_batch, d.tok)[0], 1)
out = dict(seed=seed, curve=[], hit={str(b): {} for b in betas})
def stop(step):
    for b, e in emas.items():
        torch._foreach_lerp_(e, [p.detach() for p in params], 1 - b)
    if step % 25:
        return False
    m.eval(); row = dict(step=step, raw=acc(m, "pretrain_val"))
    for b, e in emas.items():
        with torch.no_grad():
            for q, v in zip([p for p in avg.parameters() if p.requires_grad], e): q.copy_(v)
        avg.eval(); row[str(b)] = a = acc(avg, "pretrain_val")
        for t in targets:
            if a >= 100 * t and str(t) not in out["hit"][str(b)]:
                out["hit"][str(b)][str(t)] = dict(step=step, pv=a, val=acc(avg, "val"), raw_pv=row["raw"], raw_val=acc(m, "val"))
    out["curve"].append(row); print(row, flush=True)
    m.train()
    return all(str(targets[-1]) in h for h in out["hit"].values())
train.set_trainable(avg, ["llm."])
tc = train.TrainConfig(batch_size=32, seed=seed, log_every=10000, name="pretrain")
t = time.time()
train.train(m, train.param_groups(m, 3e-3, 0.0), train.batches_of(d.split("pretrain"), d.text_batch, tc), 1500, tc, stop=stop)
out["time"] = round(time.time() - t)
print(json.dumps(out["hit"]))
open("results/v11-selection/ema_probe.jsonl", "a").write(json.dumps(out) + "\n")
