"""
rundir.py - the run directory OUT, so that train.py reads as the paper's pipeline: its settings (run.json), one writer
(.lock), a stamped checkpoint per finished stage (<stage>.pt; --resume: <stage>.partial.pt), results.json and
importance.json replaced whole, --reanalyse's record and --init-from's copy. Imports no project file.
"""
import hashlib, json, os, re, shutil, time, zipfile
fcntl = __import__("fcntl") if os.name == "posix" else None  # the lock (Windows runs without)

import torch
import torch.distributed as dist

def save_checkpoint(path, ckpt):  # one dict (config, weights, ...), atomically: a crash never leaves half of one
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)

def load_checkpoint(path):  # on the CPU; one that cannot be read is named, with the fix, in one line
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated (PytorchStreamReader), not a zip, a pickle that is not plain data, ...
        raise SystemExit(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to redo that stage "
                         "(a .partial.pt: to restart it), or --force to start over")

def resume(partial, model, opt, go_on, held):
    """An interrupted stage's resume file: loaded with --resume (go_on), else named; its held-out losses into held.
    -> (start step, losses so far)"""
    if partial and os.path.exists(partial) and go_on:
        ck = load_checkpoint(partial)
        model.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])  # dropout draws continue exactly (batches are a function of step)
        print(f"{os.path.basename(partial)[:-11]}: resumed at step {ck['step']}")
        held[:] = ck.get("held", [])
        return ck["step"], ck["losses"]
    if partial and os.path.exists(partial):
        print(f"{os.path.basename(partial)[:-11]}: starting over; {partial} holds an interrupted run (--resume: go on)")
    return 0, []

CHECKPOINT = {"align": "align_raw", "align_compress": "align"}  # train()'s stage name -> its OUT/<name>.pt, if other

def train_plan(args, done, seeds_after=0):
    """-> TrainConfig.plan: (train()'s stage name, steps) of each stage still to train, then the later --seeds' steps
    (each: every stage, or the fine-tuning alone when --init-from brings the aligned model)."""
    every = [] if args.init_from else [("pretrain", 0 if args.llm else args.pretrain_steps),
                                       ("align", args.align_steps), ("align_compress", args.compress_steps)]
    every += [(f"ft_{m}", args.steps) for m in args.methods]
    plan = [(n, s) for n, s in every if s and not done(CHECKPOINT.get(n, n))]
    return tuple(plan) + (("later seeds", seeds_after * sum(s for _, s in every)),)

def eta_line(plan, name, left, sec):  # this stage's `left` steps and every later one's, all at this stage's sec a step
    left += sum(s for _, s in plan[[n for n, _ in plan].index(name) + 1:])
    t = left * sec
    when = f"{t / 86400:.1f} days" if t > 2 * 86400 else f"{t / 3600:.1f} h" if t > 7200 else f"{t / 60:.1f} min"
    return (f"{name}: the whole run has {left:,} training steps left, about {when} at this stage's {1000 * sec:.0f} "
            "ms a step (a guide: stages differ in speed, early stopping may end one sooner, measurements not counted)")

def read_json(path, empty=None):  # (or `empty` if there is none); an unreadable one is named in one line
    try:
        return json.load(open(path)) if empty is None or os.path.exists(path) else empty
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: unreadable ({e}); restore it, or --force to start the run over")

def save_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)  # never a half-written file

def merge(into, new):  # one level deep: train_loss, distribution, ... gather the entries of every stage and method
    for k, v in new.items():
        into[k] = {**into.get(k, {}), **v} if isinstance(v, dict) and isinstance(into.get(k), dict) else v

def barrier(world):  # DDP: wait until rank 0 has written what the other ranks read next
    if world > 1:
        dist.barrier()

def portable(s):  # where the data and the source run lie is no setting: a moved run is the same run
    return {k: os.path.basename(str(v)) if k in ("data_dir", "manifest", "init_from") else v for k, v in s.items()}

def stamp(settings, skip=()):  # a checkpoint's mark of the settings that made it
    mine = {k: v for k, v in portable(settings).items() if k not in skip}
    return hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:12]

class RunDir:
    def __init__(self, out, settings, force=False, reanalyse=False, master=True, world=1, shared=()):
        """One writer (a lock the OS drops at exit), one run: its settings, stamped on its checkpoints (but shared's)."""
        self.out, self.master, self.world = out, master, world
        self.stamps = stamp(settings), stamp(settings, shared)
        self.defer = reanalyse  # --reanalyse: results files replaced once, complete
        self.lock = lock(out) if master else None
        try:
            if master:
                self.check(settings, force)
            barrier(world)
            self.results = read_json(self.path("results.json"), {"methods": {}, "timing_s": {}})
            self.report = read_json(self.path("importance.json"), {"distribution": {}, "top5_share": {}})
        except BaseException:
            self.close()  # an unreadable file releases the lock too
            raise

    def check(self, mine, force):
        """Another run's settings, or a setting this train.py no longer has, are refused; --force starts over."""
        made, ours = [f for f in os.listdir(self.out) if f.endswith(".pt") or f == "data"], portable(mine)
        diff = [f"{k}={v!r}->{mine[k]!r}" if k in mine else f"{k}={v!r}: not a setting now"
                for k, v in portable(read_json(self.path("run.json"), {})).items() if k not in ours or ours[k] != v]
        if made and diff and not force:
            raise SystemExit(f"--out {self.out}: holds a run with other settings ({', '.join(diff[:4])}); "
                             "use another --out, or --force to delete it")
        if made and diff:  # --force: start over, OUT/data included (it may hold a world for other settings)
            shutil.rmtree(self.path("data"), ignore_errors=True)
            for f in [f for f in os.listdir(self.out) if f.endswith((".pt", ".json", ".png"))]:
                os.remove(self.path(f))
        save_json(self.path("run.json"), mine)

    def path(self, name):
        return os.path.join(self.out, name)

    def done(self, name):  # a finished stage: its checkpoint is there
        return os.path.exists(self.path(f"{name}.pt"))

    def load(self, name, model=None):
        """A finished stage's checkpoint, made by this run (its stamp) with `model`'s config (a field newer than the
        checkpoint: at its default); its weights into `model`, its numbers into the results (a lost one is rebuilt)."""
        path, want = self.path(f"{name}.pt"), self.stamps[not name.startswith("ft_")]  # ft_*: every setting
        ck = load_checkpoint(path)
        if model is not None and (theirs := {**vars(type(model.cfg)()), **ck.get("config", {})}) != vars(model.cfg):
            diff = [k for k in theirs if theirs[k] != vars(model.cfg).get(k)]
            raise SystemExit(f"{path}: made with another model config ({', '.join(diff)}); --force or another --out")
        if ck.get("settings", want) != want:
            raise SystemExit(f"{path}: made by a run with other settings than OUT/run.json's; delete it to redo it")
        if model is not None:
            model.load_state_dict(ck["model"], strict=False)
        merge(self.results, ck.get("results", {}))
        merge(self.report, ck.get("report", {}))
        return ck

    def finish(self, name, fn):  # run a stage: ck = fn(), saved as OUT/<name>.pt (stamped); its numbers to the results
        t, ck = time.time(), fn()
        merge(self.results, ck.get("results", {}))
        merge(self.report, ck.get("report", {}))
        self.results["timing_s"][name] = round(time.time() - t, 1)
        if self.master:
            save_checkpoint(self.path(f"{name}.pt"), {**ck, "settings": self.stamps[not name.startswith("ft_")]})
        self.save()
        barrier(self.world)  # the checkpoint is written before any rank reads it
        return ck

    def save(self, final=False):
        """results.json and importance.json, each replaced atomically; --reanalyse replaces them once, complete."""
        if self.master and (final or not self.defer):
            save_json(self.path("results.json"), self.results)
            save_json(self.path("importance.json"), self.report)

    def todo(self, methods, reanalyse):
        """The methods still to fine-tune and measure (all under --reanalyse), and those measured already."""
        done = dict(self.results["methods"])
        for m in [] if reanalyse else set(done) & set(methods):  # their results stand on their checkpoints
            if not self.done(f"ft_{m}"):
                del done[m]  # deleted: fine-tuned again
            elif not zipfile.is_zipfile(self.path(f"ft_{m}.pt")):  # torch.save writes a zip: a truncated one is not
                raise SystemExit(f"{self.path(f'ft_{m}.pt')}: truncated; delete it to fine-tune {m} again")
        return [m for m in methods if m not in done or reanalyse], done

    def close(self):  # the lock is released
        if self.lock:
            self.lock.close()

def lock(out):
    try:
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot write there ({e.strerror}); give a writable directory")
    try:
        fcntl and fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (Windows: no lock)
    except BlockingIOError:
        f.seek(0)
        holder = f.read()
        f.close()
        raise SystemExit(f"--out {out}: another train.py (pid {holder}) is writing to it; wait for it to end, "
                         "or use another --out")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f

def read_record(args):
    """--reanalyse: the settings not given on the command line from OUT/run.json, the methods from OUT/ft_*.pt."""
    if not os.path.exists(os.path.join(args.out, "run.json")):
        raise SystemExit(f"--reanalyse: {os.path.join(args.out, 'run.json')} not found; give a run made by train.py")
    for k in (rec := read_json(os.path.join(args.out, "run.json"))).keys() - args.given:  # a moved run: its world
        setattr(args, k, rec[k] if k != "data_dir" or os.path.exists(rec[k]) else  # (by name) beside OUT
                os.path.join(os.path.dirname(args.data_dir), os.path.basename(rec[k])))
    if "method" not in args.given:
        args.methods = sorted(f[3:-3] for f in os.listdir(args.out) if re.fullmatch(r"ft_\w+\.pt", f))
    if not args.manifest and not os.path.exists(os.path.join(args.data_dir, "manifest.jsonl")):
        raise SystemExit(f"--reanalyse: the run's data ({args.data_dir}) is gone; re-analysis needs exactly its data")

def check_init_from(src, mine, fine_tuning):
    """--init-from RUN: a finished run whose settings equal mine but for fine_tuning's. -> its results, its report"""
    need = ("run.json", "results.json", "importance.json", "importance_original.pt")
    if not all(os.path.exists(os.path.join(src, f)) for f in need):
        raise SystemExit(f"--init-from {src}: not a finished run (needs {', '.join(need)})")
    theirs = read_json(os.path.join(src, "run.json"))
    if diff := [f"{k}={v!r}" for k, v in theirs.items() if k not in fine_tuning and mine.get(k, v) != v]:
        raise SystemExit(f"--init-from {src}: its pretrain/align/analysis settings differ ({', '.join(diff[:4])})")
    return [read_json(os.path.join(src, f)) for f in ("results.json", "importance.json")]

def init_from(run, src, copied):
    """Copy RUN's checkpoints and numbers up to the analysis (copied: check_init_from's): seeds of one aligned model."""
    (res, rep), run.results["init_from"] = copied, src
    if os.path.exists(run.path("importance_original.pt")):
        return  # copied by an earlier start of this run
    run.results.update({k: v for k, v in res.items() if k in ("pretrain", "no_ft", "train_loss", "s2t_chance")
                        or "importance" in k})
    for k, v in rep.items():  # the original LLM's entries; a method's are its own
        run.report[k] = {**run.report.get(k, {}), **{n: x for n, x in v.items() if n.startswith("original")}} if k in \
            ("distribution", "top5_share", "concentration", "distribution_own") else v
    for f in ("pretrain.pt", "align_raw.pt", "align.pt", "importance_original.pt", "self_targets.pt"):
        if run.master and os.path.exists(os.path.join(src, f)) and not os.path.exists(run.path(f)):
            shutil.copyfile(os.path.join(src, f), run.path(f))
    barrier(run.world)
