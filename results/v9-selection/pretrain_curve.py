# pretrain-only learning curve: T2T every 50 steps on (a) speech entities typed in the val/test phrasings (a proxy
# with no test entity), (b) val, (c) test. python /tmp/exp/curve.py SEED STEPS
import os, sys, time, json, torch
sys.path.insert(0, ".")
import train, data, evaluate
from model import ModelConfig, SpeechLLM
torch.set_num_threads(1)
seed, steps = int(sys.argv[1]), int(sys.argv[2])
args = train.get_args(["--out", "/tmp/exp/x", "--data-dir", "runs/data/formant-e128-s0-v4"])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
world = json.load(open(args.data_dir + "/world.json"))
half = len(world) // 2
proxy = [dict(id=f"proxy-{e['name']}-{a}-{p}", transcript=q, question=q, answer=e[a], task="qa", split="proxy")
         for e in world[:half] for a in data.ATTRIBUTES for p in data.PHRASINGS["val"]
         for q in [data.QUESTIONS[a][p].format(e=e["name"])]]
torch.manual_seed(seed)
m = SpeechLLM(ModelConfig())
rows = d.split("pretrain")
train.set_trainable(m, ["llm."])
tc = train.TrainConfig(name="pretrain", batch_size=32, seed=seed, log_every=10000)
curve = []
class Stop(Exception): pass
batches = train.batches_of(rows, d.text_batch, tc)
def hooked(step):
    if step >= 600 and step % 50 == 0:
        m.eval()
        pt = {k: round(100 * evaluate.accuracy(m, s, d.text_batch, d.tok)[0], 1) for k, s in (("proxy", proxy), ("val", d.split("val")), ("test", d.split("test")))}
        m.train()
        curve.append(dict(step=step, **pt)); print(seed, curve[-1], flush=True)
    return batches(step)
t = time.time()
train.train(m, train.param_groups(m, 3e-3), hooked, steps, tc)
m.eval()
pt = {k: round(100 * evaluate.accuracy(m, s, d.text_batch, d.tok)[0], 1) for k, s in (("proxy", proxy), ("val", d.split("val")), ("test", d.split("test")))}
curve.append(dict(step=steps, **pt))
out = dict(seed=seed, steps=steps, time=round(time.time() - t), curve=curve)
open("/tmp/exp/curve.jsonl", "a").write(json.dumps(out) + "\n")
