import sys, torch, collections
sys.path.insert(0, ".")
import train, data, evaluate
from model import ModelConfig, SpeechLLM, load_checkpoint
torch.set_num_threads(2)
args = train.get_args(["--out", "/tmp/exp/x", "--data-dir", "runs/data/formant-e128-s0-v5"])
d = train.load_data(args, args.data_dir, args.data_dir + "/manifest.jsonl", True, 1)
for run in sys.argv[1:]:
    m = SpeechLLM(ModelConfig()); m.load_state_dict(load_checkpoint(run + "/pretrain.pt")["model"], strict=False); m.eval()
    for split in ("test", "pretrain_val"):
        rows = d.split(split); acc, _, preds = evaluate.accuracy(m, rows, d.text_batch, d.tok)
        ok = evaluate.right(rows, preds); t = collections.defaultdict(list)
        for r, o in zip(rows, ok): _, e, a, p = r["id"].split("-"); t[(a, p)].append(o)
        print(run, split, "%.3f" % acc, " ".join(f"{a[:3]}{p}:{100*sum(v)/len(v):.0f}" for (a, p), v in sorted(t.items())))
