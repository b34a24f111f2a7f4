# The first cooldown probe behind RESULTS.md "The default v10" (session 12): the stopped LLMs of the session-11 stop
# rule (--pretrain-steps 1500 --pretrain-target 0.74, runs/stop/seed40, seed41) cool down for K steps, a fresh AdamW
# from the LR where they stopped down to 10% (cosine), then T2T on pretrain_val, val and test.
# Run from the repo root with the v5 world built:
#   python results/v10-selection/cooldown_probe.py runs/stop/seed40 40 150   (appends to /tmp/exp/cool.jsonl)
import os, sys, json, time, types, torch
sys.path.insert(0, ".")
import train, data, evaluate
from model import ModelConfig, SpeechLLM
from dataclasses import replace
torch.set_num_threads(1)
src, seed, K = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = train.get_args(["--out", "/tmp/exp/x", "--data-dir", "runs/data/formant-e128-s0-v5", "--seed", str(seed)])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
torch.manual_seed(seed)
m = SpeechLLM(ModelConfig())
ck = train.load_checkpoint(src + "/pretrain.pt")
m.load_state_dict(ck["model"], strict=False)
r = json.load(open(src + "/results.json"))
s = r["pretrain"]["steps"]
lr = 3e-3 * train.get_lr(s - 1, 1500, 75)
def acc(split):
    m.eval(); a = evaluate.accuracy(m, d.split(split), d.text_batch, d.tok)[0]; return round(100 * a, 1)
before = {k: acc(k) for k in ("pretrain_val", "val", "test")}
train.set_trainable(m, ["llm."])
tc = train.TrainConfig(batch_size=32, seed=seed + 7, log_every=10000, name="cool")
t = time.time()
m.train()
train.train(m, train.param_groups(m, lr, 0.0), train.batches_of(d.split("pretrain"), d.text_batch, tc), K, tc)
after = {k: acc(k) for k in ("pretrain_val", "val", "test")}
out = dict(seed=seed, stop=s, lr=lr, K=K, before=before, after=after, time=round(time.time() - t))
print(json.dumps(out)); os.makedirs("/tmp/exp", exist_ok=True); open("/tmp/exp/cool.jsonl", "a").write(json.dumps(out) + "\n")
