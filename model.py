"""
model.py - the speech LLM: Whisper encoder -> adaptor -> causal LLM (LLaMA-Omni style, first stage:
speech in, text out), as the paper describes its model.

  mel (B, 80, T) --Whisper encoder--> (B, T/2, C) 50 Hz --stack k=5, MLP--> (B, T/10, d) 10 Hz
  prompt "<s><user> <speech><assistant>" : the <speech> token is replaced by those 10 Hz embeddings,
  the LLM reads the sequence and is trained with cross-entropy on the answer tokens (+ EOS) only.

Text input ("T2T") types the question in place of <speech>. The default is tiny and trained here (a 2-layer
Whisper-architecture encoder, an 8-layer Llama); `ModelConfig.llm` / `.encoder` point to real weights instead.

    python -c "import model; print(model.SpeechLLM(model.ModelConfig()))"
"""
import importlib.util, os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

import lora

@dataclass
class ModelConfig:
    # LLM: the embedded default is a tiny Llama; `llm` = a local dir / hub id of any causal LM instead
    llm: str = ""
    vocab_size: int = 256      # = the tokenizer's
    d_llm: int = 128           # hidden size
    n_layers: int = 8          # decoder layers: the x-axis of the paper's Fig. 2/3
    n_heads: int = 4
    n_kv_heads: int = 2        # grouped-query attention, as Llama-3
    d_ff: int = 384            # SwiGLU width
    max_len: int = 256         # RoPE positions the tiny LLM is trained for
    # speech encoder: Whisper architecture; `encoder` = a local dir / hub id of a Whisper model instead
    encoder: str = ""
    n_mels: int = 80
    d_enc: int = 128
    enc_layers: int = 2
    enc_heads: int = 4
    enc_max_frames: int = 1500 # encoder positions (50 Hz): 30 s, as Whisper
    # adaptor (LLaMA-Omni): stack k frames, Linear -> ReLU -> Linear
    k: int = 5                 # 50 Hz / k=5 = 10 speech embeddings per second
    d_adaptor: int = 512       # hidden width (the paper's 2048 for a 1280-wide encoder)
    ctc_compress: bool = False # merge CTC-aligned frames into ~1 token embedding each (ours; see compress)
    ctc_tokens: list = None    # the token ids the CTC head scores, the blank first (None: the whole vocabulary)

def build_llm(cfg):
    if cfg.llm:  # a local directory of any causal LM, or a .gguf file (needs the optional gguf package)
        from transformers import AutoModelForCausalLM
        if cfg.llm.endswith(".gguf"):
            return AutoModelForCausalLM.from_pretrained(os.path.dirname(cfg.llm), gguf_file=os.path.basename(cfg.llm))
        return AutoModelForCausalLM.from_pretrained(cfg.llm)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_llm, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_len, tie_word_embeddings=True, pad_token_id=0, bos_token_id=2,
        eos_token_id=3))

def path_problem(path):
    """What keeps --llm / --encoder from loading `path` (checked before any work), or None."""
    if path.endswith(".gguf"):  # transformers dequantises a GGUF with the optional gguf package
        return ("no such .gguf file" if not os.path.isfile(path) else None if importlib.util.find_spec("gguf") else
                "reading .gguf needs the gguf package (pip install gguf accelerate)")
    if not os.path.isdir(path):
        return "no such directory (download the model and pass its directory)"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "no config.json in this directory (a save_pretrained folder; CTranslate2's: python real.py whisper)"

def build_encoder(cfg):
    if cfg.encoder:
        from transformers import WhisperModel
        return WhisperModel.from_pretrained(cfg.encoder).get_encoder()
    return WhisperEncoder(WhisperConfig(
        num_mel_bins=cfg.n_mels, d_model=cfg.d_enc, encoder_layers=cfg.enc_layers,
        encoder_attention_heads=cfg.enc_heads, encoder_ffn_dim=4 * cfg.d_enc,
        max_source_positions=cfg.enc_max_frames))

class Adaptor(nn.Module):
    """LLaMA-Omni's adaptor: concatenate k consecutive encoder frames, then a 2-layer MLP into the LLM width."""
    def __init__(self, d_in, d_hidden, d_out, k):
        super().__init__()
        self.k = k
        self.fc1 = nn.Linear(k * d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        # CTC's blank, scored as x · blank (ours): the LLM has no blank token, and scoring the blank against the
        # all-zero pad embedding fixed its logit at 0, so it could never win a frame. Zero init = that start.
        self.blank = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        B, T, C = x.shape
        x = x[:, : T // self.k * self.k].reshape(B, T // self.k, self.k * C)  # (B, T, C) -> (B, T//k, k*C)
        return self.fc2(F.relu(self.fc1(x)))                                 # (B, T//k, d_llm)

class SpeechLLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.llm = build_llm(cfg)
        d_enc, d_llm = self.encoder.config.d_model, self.llm.config.hidden_size
        self.adaptor = Adaptor(d_enc, cfg.d_adaptor, d_llm, cfg.k)

    def run_encoder(self, mel, mel_lens):
        """mel (B, n_mels, T) right-padded, mel_lens (B,) -> encoder states (B, C, T/2) at 50 Hz and their lengths.
        We run the Whisper encoder's own modules, with positions trimmed to the input's length and padded
        frames masked, instead of its forward(), which insists on exactly 3000 frames (30 s)."""
        enc = self.encoder
        T = mel.shape[-1]
        t2 = (T + 1) // 2                                                    # stride-2 conv: 100 Hz -> 50 Hz
        lens2 = (mel_lens + 1) // 2
        valid1 = (torch.arange(T, device=mel.device)[None] < mel_lens[:, None]).unsqueeze(1)   # (B, 1, T)
        valid2 = torch.arange(t2, device=mel.device)[None] < lens2[:, None]                   # (B, T/2)
        x = F.gelu(enc.conv1(mel)) * valid1             # zero the padding so batched == unbatched
        x = F.gelu(enc.conv2(x)).transpose(1, 2)        # (B, C, T) -> (B, T/2, C)
        x = x + enc.embed_positions.weight[:t2]
        mask = torch.zeros(valid2.shape, dtype=x.dtype, device=x.device).masked_fill(~valid2, torch.finfo(x.dtype).min)
        mask = mask[:, None, None, :]                   # (B, 1, 1, T/2): padded keys are never attended to
        for layer in enc.layers:
            x = layer(x, mask)
        return enc.layer_norm(x).transpose(1, 2), lens2  # (B, C, T/2), channels first like the mel input

    def encode_speech(self, batch):
        """-> speech embeddings (B, S, d_llm) at 10 Hz, lengths S_i; from mels, or batch["encoded"] encoder states."""
        dev = self.adaptor.fc1.weight.device
        h, lens = batch["speech"].to(dev), batch["speech_lens"].to(dev)
        if not batch.get("encoded"):
            h, lens = self.run_encoder(h, lens)
        return self.adaptor(h.transpose(1, 2)), lens // self.cfg.k   # (B, T/2, C) -> (B, T/2//k, d_llm)

    def compress(self, speech, lens, blank_id):
        """CTC compression (Gaido et al. 2021; ours): each 10 Hz frame x becomes softmax(x E^T) E against the LLM's
        embeddings E; frames nearest the blank are dropped, runs of one nearest token averaged, so the LLM reads ~1
        vector per token, as it reads text, not ~3 frames. (B, S, d) -> (B, S', d), S' = runs kept."""
        if not self.cfg.ctc_compress:
            return speech, lens
        # E detached: the speech path never trains the LLM's embedding table, which LoRA and a frozen LLM could
        # not use either; only the LLM's own text path (its input embeddings and tied head) moves E
        sub, E = self.ctc_vocab()
        blank_id = 0 if sub is not None else blank_id           # a sub-vocabulary holds the blank first
        logits = self.ctc_logits(speech, blank_id)              # (B, S, V): the CTC head
        ids = logits.argmax(-1)                                                    # (B, S) nearest token
        speech = logits.softmax(-1) @ E.to(speech.dtype)                           # (B, S, d) soft token embedding
        out = []
        for x, t in zip(speech, [i[:n] for i, n in zip(ids, lens.tolist())]):
            if len(t) == 0:                                                      # < 0.1 s of audio: no frame
                out.append(x[:0])
                continue
            run = torch.cat([t.new_ones(1), (t[1:] != t[:-1]).long()]).cumsum(0) - 1  # run index of each frame
            keep = t != blank_id
            if not keep.any():                                                   # all blank: keep the mean
                keep = torch.ones_like(keep)
            n_run = int(run[-1]) + 1
            sums = x.new_zeros(n_run, x.shape[-1]).index_add_(0, run[keep], x[: len(t)][keep])
            cnt = torch.bincount(run[keep], minlength=n_run)
            out.append(sums[cnt > 0] / cnt[cnt > 0, None].to(x.dtype))           # (S'_i, d)
        new_lens = torch.tensor([len(o) for o in out], device=speech.device)
        return torch.stack([F.pad(o, (0, 0, 0, int(new_lens.max()) - len(o))) for o in out]), new_lens

    @torch.no_grad()
    def precompute_encoder(self, features, batch_size=64, by_length=False):
        """{id: mel (n_mels, T)} -> {id: encoder states (C, T/2)}, once: the encoder is frozen from align on.
        by_length: batch by length (--real: 1% padding, not 39%); the toy keeps manifest order (its numbers')."""
        self.encoder.eval()
        out, ids = {}, sorted(features, key=lambda j: features[j].shape[-1]) if by_length else list(features)
        for i in range(0, len(ids), batch_size):
            mels = [features[j] for j in ids[i:i + batch_size]]
            lens = torch.tensor([m.shape[-1] for m in mels])
            mel = torch.stack([F.pad(m, (0, int(lens.max()) - m.shape[-1])) for m in mels])
            dev = next(self.parameters()).device
            h, lens2 = self.run_encoder(mel.to(dev), lens.to(dev))
            out.update({j: h[b, :, : lens2[b]].cpu() for b, j in enumerate(ids[i:i + batch_size])})
        return out

    def embed(self, batch, with_answer, left_pad, speech=None):
        """-> inputs_embeds (B, L, d), <speech> replaced by the speech; mask (B, L); labels (B, L): answer + EOS."""
        emb = self.llm.get_input_embeddings()
        speech_id = batch["speech_id"]
        if speech is None and batch.get("speech") is not None:
            speech = self.compress(*self.encode_speech(batch), batch["blank_id"])
        if speech is not None:
            speech, speech_lens = speech
        seqs, labs, j = [], [], 0
        for prompt, answer in zip(batch["prompts"], batch["answers"]):
            ids = prompt + (answer if with_answer else [])
            x = emb(torch.tensor(ids, device=emb.weight.device).clamp(min=0))      # (L, d); <speech> replaced below
            lab = [-100] * len(prompt) + (answer if with_answer else [])
            if speech_id in prompt:
                p = prompt.index(speech_id)
                s = speech[j, : speech_lens[j]].to(x.dtype)                        # (S_j, d)
                x = torch.cat([x[:p], s, x[p + 1:]])                               # (L - 1 + S_j, d)
                lab = lab[:p] + [-100] * len(s) + lab[p + 1:]
                j += 1
            seqs.append(x)
            labs.append(torch.tensor(lab, device=x.device))
        L = max(len(s) for s in seqs)
        pad = lambda t, v: F.pad(t, ((L - len(t), 0) if left_pad else (0, L - len(t))), value=v)
        x = torch.stack([F.pad(s, (0, 0) + ((L - len(s), 0) if left_pad else (0, L - len(s)))) for s in seqs])
        mask = torch.stack([pad(torch.ones(len(s), dtype=torch.long, device=x.device), 0) for s in seqs])
        labels = torch.stack([pad(l, -100) for l in labs])
        return x, mask, labels

    def loss(self, batch, reduction="mean", ctc_weight=0.0, n_tokens=None, teacher_logits=None, kl_temp=1.0,
             ctc_only=False):
        """Cross-entropy on the answer tokens + EOS (+ ctc_weight x the CTC loss). n_tokens: divide the sum by the
        whole step's count (so accumulation and DDP give one big batch's gradient). teacher_logits (N, V): instead
        T²·KL(teacher_T || student_T) per answer token. ctc_only: the CTC loss alone, the LLM not run."""
        speech = self.encode_speech(batch) if batch.get("speech") is not None else None
        if ctc_only:  # align's first phase: only the CTC head is trained; the LLM is not run at all
            return ctc_weight * self.ctc_loss(speech, batch)
        x, mask, labels = self.embed(batch, with_answer=True, left_pad=False,
                                     speech=self.compress(*speech, batch["blank_id"]) if speech else None)
        logits = self.llm(inputs_embeds=x, attention_mask=mask).logits           # (B, L, vocab)
        if teacher_logits is None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                                   reduction="sum" if n_tokens is not None else reduction)
        else:  # Hinton et al. 2015: the T² keeps the gradient's scale independent of the temperature
            student = logits[:, :-1][labels[:, 1:] != -100].float() / kl_temp          # (N, V), row-major order
            loss = kl_temp ** 2 * F.kl_div(student.log_softmax(-1), (teacher_logits.float() / kl_temp).log_softmax(-1),
                                           log_target=True, reduction="sum")
            loss = loss / len(student) if n_tokens is None else loss
        loss = loss / n_tokens if n_tokens is not None else loss
        return loss + ctc_weight * self.ctc_loss(speech, batch) if ctc_weight and speech else loss

    @torch.no_grad()
    def answer_logits(self, batch):
        """The logits predicting each answer token + EOS, (N, V): a teacher's targets (typed or spoken, N lines up)."""
        x, mask, labels = self.embed(batch, with_answer=True, left_pad=False)
        logits = self.llm(inputs_embeds=x, attention_mask=mask).logits           # (B, L, vocab)
        return logits[:, :-1][labels[:, 1:] != -100]

    forward = loss  # so that a DistributedDataParallel wrapper, which syncs gradients through forward(), can call it

    def ctc_vocab(self):
        """The CTC head's rows: (None, E), the LLM's input embeddings, or (ids, E[ids]) for cfg.ctc_tokens (blank
        first; a real LLM's 49k rows cost ~40x its transcripts' ~1.3k). Detached: they move the speech side only."""
        E = self.llm.get_input_embeddings().weight.detach()
        if not self.cfg.ctc_tokens:
            return None, E
        ids = torch.tensor(self.cfg.ctc_tokens, device=E.device)
        return ids, E[ids]

    def ctc_logits(self, speech, blank_id):
        """The CTC head, (B, S, d) -> (B, S, V) against ctc_vocab's rows; the blank's column against a learned one."""
        E = self.ctc_vocab()[1]
        logits = speech @ E.T.to(speech.dtype)
        logits[..., blank_id] = speech @ self.adaptor.blank.to(speech.dtype)
        return logits

    def ctc_loss(self, speech, batch):
        """Auxiliary alignment loss (ours): CTC between the speech embeddings, scored against the LLM's input
        embeddings (ctc_logits), and the transcript: each spoken word pulled towards an embedding the LLM reads."""
        speech, lens = speech                                                      # (B, S, d), (B,)
        targets, blank = batch["transcripts"], batch["blank_id"]
        if self.cfg.ctc_tokens:  # token ids -> their index in the sub-vocabulary (the blank is index 0)
            index = {t: i for i, t in enumerate(self.cfg.ctc_tokens)}
            targets, blank = [[index[t] for t in ts] for ts in targets], 0
        logp = self.ctc_logits(speech, blank).float().log_softmax(-1)             # (B, S, V)
        flat = torch.tensor([t for ts in targets for t in ts], device=speech.device)
        return F.ctc_loss(logp.transpose(0, 1), flat, lens, torch.tensor([len(t) for t in targets]),
                          blank=blank, zero_infinity=True)

    @torch.no_grad()
    def ctc_transcribe(self, batch):
        """Greedy CTC: each 10 Hz frame's nearest token, runs merged, blanks dropped -> token-id lists. With CTC
        compression this is the text the LLM reads in place of the spoken question (compress: one vector a run)."""
        speech, lens = self.encode_speech(batch)                                   # (B, S, d), (B,)
        sub = self.ctc_vocab()[0]
        blank = 0 if sub is not None else batch["blank_id"]
        ids = self.ctc_logits(speech, blank).argmax(-1)                            # (B, S)
        out = []
        for t in [i[:n] for i, n in zip(ids, lens.tolist())]:
            t = torch.unique_consecutive(t)
            t = t[t != blank]
            out.append((sub[t] if sub is not None else t).tolist())
        return out

    @torch.no_grad()
    def generate(self, batch, max_new_tokens=16, eos_id=None):
        """Batched greedy decoding with a KV cache from left-padded inputs_embeds -> token-id lists, EOS excluded."""
        x, mask, _ = self.embed(batch, with_answer=False, left_pad=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)       # positions count real tokens only
        out = self.llm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True,
                       logits_to_keep=1)                # the last position's logits only (a real vocab is 49k wide)
        B = x.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        tokens = []
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)          # (B,)
            tokens.append(nxt)
            done |= nxt == eos_id
            if done.all():
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.llm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                           cache=out.cache, use_cache=True)  # `cache` was `past_key_values` before transformers 5.2x
        tokens = torch.stack(tokens, 1).tolist()
        return [t[: t.index(eos_id)] if eos_id in t else t for t in tokens]

def autocast(device, dtype):
    """Mixed precision: forward passes in bf16/fp16 where safe, weights and optimizer state in fp32."""
    if dtype == "fp32":
        return nullcontext()
    # no weight cache: Table 1 zeroes weights in place between forward passes, and a cached half-precision copy
    # would hide that (on a GPU in bf16, every masked perplexity came out exactly the baseline)
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16 if dtype == "bf16" else torch.float16,
                          cache_enabled=False)

def trainable_state(model):
    """Only the parameters that train: the rest is in the stage checkpoint the run started from."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}

def set_trainable(model, prefixes):
    for n, p in model.named_parameters():
        p.requires_grad = n.startswith(tuple(prefixes))

def count(model):  # what is printed before every stage
    trainable, total = lora.count_parameters(model)
    return f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.2f}M ({100 * trainable / total:.1f}%)"

def mel_bins(encoder):  # the log-mel bins the encoder reads: a pretrained Whisper's own, else ModelConfig's
    return WhisperConfig.from_pretrained(encoder).num_mel_bins if encoder else ModelConfig.n_mels

def build_model(cfg, seed, device, stages=()):
    """Seeded initial (or pretrained) weights, then the finished stages' trained ones (their checkpoints' "model")."""
    torch.manual_seed(seed)
    model = SpeechLLM(cfg).to(device)
    for state in stages:
        model.load_state_dict(state, strict=False)
    return model
