"""Train a small byte-level transformer on the Python standard library's source.

A real, self-contained training loop instrumented with outrider's probe. The text
is the stdlib's own ``.py`` files, so it runs anywhere Python does, with no
downloads. Defaults finish in about two minutes on a 2-core CPU and take the
train loss from ~5.5 (uniform over 256 bytes) to under 2.5.

Every step hands the probe the loss and gradient norm as 0-d tensors: converting
them to Python numbers here would force a host-device sync on the training
thread, which is exactly the cost outrider moves elsewhere.

    python examples/train_charlm.py --steps 400 --device cpu
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import probe

VOCAB = 256  # bytes: no tokenizer, no unknown characters
PROMPT = "def "
MISBEHAVIOURS = ("lr-spike", "nan", "collapse")


def load_stdlib_text(max_bytes: int) -> bytes:
    """Concatenate stdlib ``.py`` files in sorted order until ``max_bytes``.

    Sorted paths and skipping site-packages and the test suites make the corpus
    identical from run to run on the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    chunks: list[bytes] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            data = (Path(dirpath) / name).read_bytes()
            chunks.append(data[: max_bytes - total])
            total += len(chunks[-1])
            if total >= max_bytes:
                return b"".join(chunks)
    return b"".join(chunks)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """Decoder-only transformer over bytes with learned positions and a tied head."""

    def __init__(self, context: int, layers: int, d_model: int, heads: int) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln_f(self.blocks(self.tok(idx) + self.pos(pos))))


def get_batch(
    data: Tensor, batch: int, context: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Sample random windows; the target is the input shifted by one byte."""
    starts = torch.randint(len(data) - context - 1, (batch,), generator=gen)
    x = torch.stack([data[s : s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + context + 1] for s in starts.tolist()])
    return x.long(), y.long()


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 5% of the steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def sample(model: CharLM, n: int, device: str, seed: int) -> str:
    """Generate ``n`` bytes after ``PROMPT`` at temperature 0.8 with a fixed seed."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([list(PROMPT.encode())], device=device)
    for _ in range(n):
        logits = model(idx[:, -model.context :])[:, -1] / 0.8
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt], dim=1)
    model.train()
    # An untrained model emits arbitrary bytes: show those as '?' rather than mojibake.
    printable = (b if b in (9, 10) or 32 <= b < 127 else 63 for b in idx[0].tolist())
    return bytes(printable).decode("ascii")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a byte-level LM on the stdlib source.")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=None, help="stop early by wall time")
    p.add_argument(
        "--min-steps", type=int, default=0, help="with --max-seconds: train at least this many"
    )
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--sample-every", type=int, default=200)
    p.add_argument("--print-every", type=int, default=50)
    p.add_argument("--features-every", type=int, default=100)
    p.add_argument("--data-bytes", type=int, default=3_000_000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--misbehave",
        choices=MISBEHAVIOURS,
        default=None,
        help="break the run on purpose from --misbehave-at on, to watch the agent's alerts fire: "
        "lr-spike (learning rate x100: loss spike, gradient explosion), nan (a NaN loss once: "
        "non-finite loss and gradients), collapse (every feature row the same: "
        "representation collapse)",
    )
    p.add_argument(
        "--misbehave-at", type=int, default=None, help="step to misbehave from (default: half-way)"
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    probe.init()
    probe.config(vars(args))
    torch.manual_seed(args.seed)

    raw = load_stdlib_text(args.data_bytes)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    gen = torch.Generator().manual_seed(args.seed)
    val_batches = [
        tuple(t.to(args.device) for t in get_batch(val, args.batch_size, args.context, gen))
        for _ in range(4)
    ]

    model = CharLM(args.context, args.layers, args.d_model, args.heads).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"data {len(raw):,} bytes | model {n_params:,} params | device {args.device}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    tokens_per_step = args.batch_size * args.context
    # One line for the telemetry the seeds log by hand: step time, tokens/s, lr, grad norms
    # (pre-clip), weight/grad histograms and activation statistics, all off the host path.
    watcher = probe.watch(
        model, opt, tokens_per_step=tokens_per_step, hist_every=50, activations_every=50
    )
    # The final hidden states, for the agent's rank / collapse / t-SNE statistics.
    hidden: list[Tensor] = []
    model.ln_f.register_forward_hook(lambda module, inputs, out: hidden.append(out))

    misbehave_at = args.steps // 2 if args.misbehave_at is None else args.misbehave_at
    start = time.perf_counter()
    step = 0
    for step in range(args.steps):
        misbehaving = args.misbehave is not None and step >= misbehave_at
        if step % args.eval_every == 0:
            val = probe.evaluate_lm(model, val_batches, step)
            print(f"step {step:5d} | val loss {val['val/loss'].item():.3f}", flush=True)
        if step % args.sample_every == 0:
            probe.text("samples/generation", sample(model, 120, args.device, args.seed), step=step)

        lr = lr_at(step, args.steps, args.lr)
        if misbehaving and args.misbehave == "lr-spike":
            lr *= 100
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = get_batch(train, args.batch_size, args.context, gen)
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        hidden.clear()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        inject_nan = misbehaving and args.misbehave == "nan" and step == misbehave_at
        if inject_nan:
            loss = loss * torch.tensor(float("nan"), device=loss.device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # pre-clip norm, a tensor
        if not inject_nan:  # like AMP's GradScaler, skip the step whose gradients are NaN
            opt.step()
        probe.log({"loss": loss.detach()}, step=step)
        if hidden:
            features = hidden[-1]
            if misbehaving and args.misbehave == "collapse":
                features = features.detach()[:1, :1].expand_as(features)
            probe.features("hidden/final", features, step=step, every=args.features_every)

        if step % args.print_every == 0 or step == args.steps - 1:
            now = time.perf_counter()
            print(
                f"step {step:5d} | loss {loss.item():.3f} | grad norm {grad_norm.item():.2f} "
                f"| lr {lr:.2e} | {(step + 1) / (now - start):.2f} steps/s",
                flush=True,
            )
        late = args.max_seconds is not None and time.perf_counter() - start > args.max_seconds
        if late and step + 1 >= args.min_steps:
            print(f"stopping at step {step}: --max-seconds {args.max_seconds} reached")
            break

    val = probe.evaluate_lm(model, val_batches, step)
    final_sample = sample(model, 120, args.device, args.seed)
    probe.text("samples/generation", final_sample, step=step)
    probe.event("training_done", step=step, steps=step + 1)
    watcher.unwatch()
    elapsed = time.perf_counter() - start
    print(f"done: {step + 1} steps in {elapsed:.1f}s | final val loss {val['val/loss'].item():.3f}")
    print(f"sample: {final_sample!r}")
    probe.finish()


if __name__ == "__main__":
    main()
