# The cooldown sweep behind RESULTS.md "The default v10" (session 12), run before any pipeline with a cooldown:
#   python results/v10-selection/cooldown_sweep.py SEED 150   (seeds 50-53; appends to /tmp/exp/cool_sweep.jsonl)
# One pretraining pass per seed (1500-step cosine plan, T2T on pretrain_val every 25 steps); at the first check at or
# above each target, a copy cools down for K steps (fresh AdamW, from the LR at that step, cosine to 10%) -> T2T on
# pretrain_val and val (test not read: this chooses the target)
import os, sys, json, time, copy, torch
sys.path.insert(0, ".")
import train, data, evaluate
from model import ModelConfig, SpeechLLM
torch.set_num_threads(1)
seed, K = int(sys.argv[1]), int(sys.argv[2])
targets = [0.3, 0.4, 0.5, 0.6, 0.7]
args = train.get_args(["--out", "/tmp/exp/x", "--data-dir", "runs/data/formant-e128-s0-v5", "--seed", str(seed)])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
torch.manual_seed(seed)
m = SpeechLLM(ModelConfig())
train.set_trainable(m, ["llm."])
acc = lambda mm, s: round(100 * evaluate.accuracy(mm, d.split(s), d.text_batch, d.tok)[0], 1)
todo, out = list(targets), dict(seed=seed, K=K, cool={})
def stop(step):
    if step % 25: return False
    m.eval(); a = acc(m, "pretrain_val") / 100
    while todo and a >= todo[0]:
        t = todo.pop(0)
        c = copy.deepcopy(m); lr = 3e-3 * train.get_lr(step - 1, 1500, 75)
        tc = train.TrainConfig(batch_size=32, seed=seed + 1, log_every=10000, name="cool")
        c.train(); train.train(c, train.param_groups(c, lr, 0.0), train.batches_of(d.split("pretrain"), d.text_batch, tc), K, tc)
        c.eval(); out["cool"][str(t)] = dict(step=step, at=round(100 * a, 1), lr=round(lr, 5), pv=acc(c, "pretrain_val"), val=acc(c, "val"))
        print(out["cool"][str(t)], flush=True)
    m.train()
    return not todo
tc = train.TrainConfig(batch_size=32, seed=seed, log_every=10000, name="pretrain")
t = time.time()
train.train(m, train.param_groups(m, 3e-3, 0.0), train.batches_of(d.split("pretrain"), d.text_batch, tc), 1500, tc, stop=stop)
out["time"] = round(time.time() - t)
print(json.dumps(out)); os.makedirs("/tmp/exp", exist_ok=True); open("/tmp/exp/cool_sweep.jsonl", "a").write(json.dumps(out) + "\n")
