"""Model families of the failure suite: a model, deterministic synthetic data and a loss.

Every family is small enough for a step of a few milliseconds on one CPU
thread, and has data the model can learn (so that a healthy run's loss falls
and its validation loss follows): a random teacher for the MLP, noisy class
templates for the CNN, a random Markov chain for the LSTM, clustered points
seen through two noisy views for SimSiam. All data comes from one seeded
generator, so a scenario is the same run every time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]


@dataclass
class Family:
    """A model with its data: ``loss`` returns the training loss and the hidden layer
    the suite hands to ``probe.features``."""

    model: nn.Module
    train_x: Tensor
    train_y: Tensor
    val: list[Batch]
    batch_size: int
    #: SimSiam's stop-gradient (the collapse scenario switches it off)
    stop_gradient: bool = True
    #: the training pool is cut to its first ``pool`` samples (the overfitting scenario)
    pool: int | None = None
    hidden: list[Tensor] = field(default_factory=list)

    def batch(self, gen: torch.Generator) -> Batch:
        size = len(self.train_x) if self.pool is None else self.pool
        index = torch.randint(size, (self.batch_size,), generator=gen)
        return self.train_x[index], self.train_y[index]

    def loss(self, batch: Batch, gen: torch.Generator | None = None) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(x), y.flatten())

    def logits(self, x: Tensor) -> Tensor:
        self.hidden.clear()
        out: Tensor = self.model(x)
        return out.flatten(0, -2) if out.dim() > 2 else out

    def random_labels(self, y: Tensor, gen: torch.Generator) -> Tensor:
        return torch.randint(int(self.train_y.max()) + 1, y.shape, generator=gen)

    @torch.no_grad()
    def val_loss(self) -> Tensor:
        self.model.eval()
        total = torch.stack([self.loss(batch) for batch in self.val]).mean()
        self.model.train()
        return total


def _capture(family: Family, module: nn.Module) -> None:
    """Keep ``module``'s output of the last forward pass as the family's hidden layer."""
    module.register_forward_hook(lambda _m, _i, out: family.hidden.append(out))


def _split(x: Tensor, y: Tensor, n_val: int, batch_size: int) -> tuple[Tensor, Tensor, list[Batch]]:
    val = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n_val, batch_size)]
    return x[n_val:], y[n_val:], val


def mlp(gen: torch.Generator, width: int = 128) -> Family:
    """Ten classes from a random linear teacher over 32 features, 10% of labels flipped."""
    n, dim, classes = 9216, 32, 10
    x = torch.randn(n, dim, generator=gen)
    y = (x @ torch.randn(dim, classes, generator=gen)).argmax(1)
    flip = torch.rand(n, generator=gen) < 0.1
    y = torch.where(flip, torch.randint(classes, (n,), generator=gen), y)
    model = nn.Sequential(
        nn.Linear(dim, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        # no bias: a zeroed network has exactly zero gradients (the vanishing scenario)
        nn.Linear(width, classes, bias=False),
    )
    train_x, train_y, val = _split(x, y, 1024, 256)
    family = Family(model, train_x, train_y, val, batch_size=64)
    _capture(family, model[3])
    return family


def cnn(gen: torch.Generator) -> Family:
    """16x16 images: one smooth random template per class, shifted, scaled and noisy."""
    n, classes = 6144, 10
    templates = F.avg_pool2d(torch.randn(classes, 1, 24, 24, generator=gen), 5, 1) * 5
    y = torch.randint(classes, (n,), generator=gen)
    offsets = torch.randint(0, 5, (n, 2), generator=gen).tolist()
    x = torch.stack(
        [
            templates[c, :, i : i + 16, j : j + 16]
            for c, (i, j) in zip(y.tolist(), offsets, strict=True)
        ]
    )
    x = x * (0.5 + torch.rand(n, 1, 1, 1, generator=gen)) + torch.randn(x.shape, generator=gen)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )
    train_x, train_y, val = _split(x, y, 1024, 256)
    family = Family(model, train_x, train_y, val, batch_size=64)
    _capture(family, model[8])
    return family


class _LSTM(nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, width, batch_first=True)
        self.out = nn.Identity()  # the hidden states, for probe.features
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        states, _ = self.lstm(self.embed(tokens))
        out: Tensor = self.head(self.out(states))
        return out


def lstm(gen: torch.Generator) -> Family:
    """Next-token prediction on sequences from a random sparse Markov chain over 16 tokens."""
    n, vocab, length = 4096, 16, 33
    transitions = torch.softmax(torch.randn(vocab, vocab, generator=gen) * 2.5, dim=1)
    seqs = torch.empty(n, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(vocab, (n,), generator=gen)
    for t in range(1, length):
        seqs[:, t] = torch.multinomial(transitions[seqs[:, t - 1]], 1, generator=gen).squeeze(1)
    train_x, train_y, val = _split(seqs[:, :-1], seqs[:, 1:], 512, 256)
    family = Family(_LSTM(vocab, 64), train_x, train_y, val, batch_size=32)
    _capture(family, family.model.out)  # type: ignore[arg-type]
    return family


class _SimSiam(nn.Module):
    """Encoder and predictor. The encoder's last layer has no batch norm (SimSiam's
    ablation): with it, this toy collapses too slowly for the suite."""

    def __init__(self, dim: int, width: int, embed: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(dim, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, embed),
        )
        self.predictor = nn.Sequential(
            nn.Linear(embed, width // 2),
            nn.BatchNorm1d(width // 2),
            nn.ReLU(),
            nn.Linear(width // 2, embed),
        )


@dataclass
class SimSiamFamily(Family):
    """SimSiam on two noisy, masked views of clustered points: negative cosine similarity
    of each view's prediction and the other view's embedding (stop-gradient on the
    embedding unless the collapse scenario removed it)."""

    noise: float = 0.6

    def views(self, x: Tensor, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
        def view() -> Tensor:
            keep = torch.rand(x.shape, generator=gen) > 0.2
            return (x + self.noise * torch.randn(x.shape, generator=gen)) * keep

        return view(), view()

    def loss(self, batch: Batch, gen: torch.Generator | None = None) -> Tensor:
        x, _ = batch
        if gen is None:  # validation: fixed views
            gen = torch.Generator().manual_seed(1)
        simsiam: _SimSiam = self.model  # type: ignore[assignment]
        self.hidden.clear()
        v1, v2 = self.views(x, gen)
        z1, z2 = simsiam.encoder(v1), simsiam.encoder(v2)
        p1, p2 = simsiam.predictor(z1), simsiam.predictor(z2)
        if self.stop_gradient:
            z1, z2 = z1.detach(), z2.detach()
        cos = F.cosine_similarity
        return -(cos(p1, z2).mean() + cos(p2, z1).mean()) / 2

    def random_labels(self, y: Tensor, gen: torch.Generator) -> Tensor:
        return y


def simsiam(gen: torch.Generator) -> Family:
    """64 clusters in 32 dimensions; an embedding of 32."""
    n, dim, clusters = 6144, 32, 64
    centres = torch.randn(clusters, dim, generator=gen) * 2
    y = torch.randint(clusters, (n,), generator=gen)
    x = centres[y] + 0.5 * torch.randn(n, dim, generator=gen)
    model = _SimSiam(dim, 128, 32)
    train_x, train_y, val = _split(x, y, 1024, 256)
    family = SimSiamFamily(model, train_x, train_y, val, batch_size=128)
    _capture(family, model.encoder)
    return family


FAMILIES = {"mlp": mlp, "cnn": cnn, "lstm": lstm, "simsiam": simsiam}
