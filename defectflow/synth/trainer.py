"""One StyleGAN2-ADA training step at a time: losses, lazy R1, style mixing, EMA, ADA, checkpoints.

Losses (non-saturating logistic): G minimises softplus(-D(A(G(z)))), D minimises
softplus(D(A(G(z)))) + softplus(-D(A(x))), A the ADA augmentation. Every ``r1_interval`` D steps
the R1 penalty gamma/2 * |grad_x D(A(x))|^2 is added, scaled by the interval (lazy regularisation),
and the Adam betas / learning rate of D are adjusted for it as in the paper. The EMA generator
``g_ema`` follows G with a half-life of ``ema_kimg`` thousand images (ramped up over the first
``ema_rampup`` of the run). All randomness comes from one seeded ``torch.Generator`` saved with the
checkpoint, so a resumed run repeats the same next step.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from defectflow.errors import DefectflowError
from defectflow.fsutil import atomic_path
from defectflow.synth.ada import AdaController, augment
from defectflow.synth.networks import Discriminator, Generator, NetConfig

CHECKPOINT_VERSION = 1


class CheckpointError(DefectflowError):
    """A generator checkpoint is unreadable or does not fit the requested networks."""


@dataclass(frozen=True)
class TrainConfig:
    batch: int = 32
    lr: float = 0.0025
    gamma: float | None = None       # R1 weight; None: 0.0002 * size^2 / batch (the ADA paper's heuristic)
    r1_interval: int = 16
    ema_kimg: float = 2.0
    ema_rampup: float | None = 0.05
    mixing: float = 0.9
    ada_target: float = 0.6
    ada_kimg: float = 20.0
    ada_interval: int = 4
    w_avg_beta: float = 0.995

    def r1_gamma(self, size: int) -> float:
        return self.gamma if self.gamma is not None else 0.0002 * size * size / self.batch


class Trainer:
    """G, D, EMA G and their optimisers over ``reals`` ``(N, 3, S, S)`` in [-1, 1]."""

    def __init__(self, net: NetConfig, cfg: TrainConfig, reals: torch.Tensor, *, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if reals.ndim != 4 or reals.shape[1:] != (3, net.size, net.size):
            raise ValueError(f"reals must be (N, 3, {net.size}, {net.size}), got {tuple(reals.shape)}")
        self.net, self.cfg, self.device = net, cfg, torch.device(device)
        torch.manual_seed(seed)                                    # initial weights
        self.G, self.D = Generator(net).to(self.device), Discriminator(net).to(self.device)
        self.g_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        mb = cfg.r1_interval / (cfg.r1_interval + 1)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=(0.0, 0.99), eps=1e-8)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr * mb, betas=(0.0, 0.99 ** mb), eps=1e-8)
        self.ada = AdaController(cfg.ada_target, cfg.ada_kimg, cfg.ada_interval)
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        self.reals = reals.to(self.device)
        self.step, self.nimg = 0, 0
        self.last: dict = {}

    # -- sampling -------------------------------------------------------------------------------
    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.net.z_dim, generator=self.rng, device=self.device)

    def _fakes(self, n: int) -> torch.Tensor:
        z = self._z(n)
        mix = {}
        if self.cfg.mixing > 0 and float(torch.rand((), generator=self.rng, device=self.device)) < self.cfg.mixing:
            cutoff = int(torch.randint(1, self.G.num_ws, (), generator=self.rng, device=self.device))
            mix = {"z_mix": self._z(n), "cutoff": cutoff}
        ws = self.G.ws(z, track=self.cfg.w_avg_beta, **mix)
        return self.G.synthesis(ws, self.rng)

    def _real_batch(self, n: int) -> torch.Tensor:
        idx = torch.randint(0, len(self.reals), (n,), generator=self.rng, device=self.device)
        return self.reals[idx]

    # -- one step -------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One G step and one D step (with R1 every ``r1_interval``); returns the losses and p."""
        cfg, n, p = self.cfg, self.cfg.batch, self.ada.p
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        loss_g = F.softplus(-self.D(augment(self._fakes(n), p, self.rng))).mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()

        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        with torch.no_grad():
            fakes = self._fakes(n)
        do_r1 = self.step % cfg.r1_interval == 0
        real = self._real_batch(n).detach().requires_grad_(do_r1)
        real_logits = self.D(augment(real, p, self.rng))
        fake_logits = self.D(augment(fakes, p, self.rng))
        loss_d = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        r1 = torch.zeros(())
        if do_r1:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            r1 = grad.square().sum((1, 2, 3)).mean()
            loss_d = loss_d + r1 * (cfg.r1_gamma(self.net.size) / 2) * cfg.r1_interval
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        self.ada.observe(real_logits)

        self.nimg += n
        self.step += 1
        self._update_ema()
        self.last = {"loss_g": float(loss_g.detach()), "loss_d": float(loss_d.detach()), "r1": float(r1.detach()), "p": self.ada.p}
        return self.last

    def _update_ema(self) -> None:
        ema_nimg = self.cfg.ema_kimg * 1000
        if self.cfg.ema_rampup is not None:
            ema_nimg = min(ema_nimg, self.nimg * self.cfg.ema_rampup)
        beta = 0.5 ** (self.cfg.batch / max(ema_nimg, 1e-8))
        with torch.no_grad():
            for pe, p in zip(self.g_ema.parameters(), self.G.parameters()):
                pe.copy_(p.detach().lerp(pe, beta))
            for be, b in zip(self.g_ema.buffers(), self.G.buffers()):
                be.copy_(b)

    @torch.no_grad()
    def sample(self, n: int, *, seed: int, psi: float = 1.0, batch: int = 64) -> torch.Tensor:
        """``n`` EMA-generator images in [-1, 1], a fixed function of ``seed`` (not of the training RNG)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        return sample_images(self.g_ema, n, g, psi=psi, batch=batch)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "net": self.net.to_dict(), "train": asdict(self.cfg),
                "G": self.G.state_dict(), "D": self.D.state_dict(), "g_ema": self.g_ema.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "ada": self.ada.state_dict(),
                "rng": self.rng.get_state(), "step": self.step, "nimg": self.nimg}

    def save(self, path: Path | str, extra: dict | None = None) -> Path:
        with atomic_path(path) as tmp:
            torch.save({**self.state_dict(), "extra": extra or {}}, tmp)
        return Path(path)

    def load(self, path: Path | str, *, weights_only: bool = False) -> dict:
        """Resume from ``path`` (everything), or with ``weights_only`` warm-start: networks and p, a fresh count."""
        state = read_checkpoint(path)
        if state["net"] != self.net.to_dict():
            raise CheckpointError(f"{path}: checkpoint networks {state['net']} differ from the requested {self.net.to_dict()}")
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.g_ema.load_state_dict(state["g_ema"])
        self.ada.p = float(state["ada"]["p"])
        if not weights_only:
            self.opt_g.load_state_dict(state["opt_g"])
            self.opt_d.load_state_dict(state["opt_d"])
            self.ada.load_state_dict(state["ada"])
            self.rng.set_state(state["rng"])
            self.step, self.nimg = int(state["step"]), int(state["nimg"])
        return state.get("extra", {})


def read_checkpoint(path: Path | str) -> dict:
    """The checkpoint dict at ``path``, or :class:`CheckpointError` naming the file."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: generator checkpoint not found") from None
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable generator checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: not a defectflow generator checkpoint (version {CHECKPOINT_VERSION})")
    return state


def load_generator(path: Path | str, device: str | torch.device = "cpu") -> Generator:
    """The EMA generator of a checkpoint, for sampling."""
    state = read_checkpoint(path)
    g = Generator(NetConfig(**state["net"]))
    g.load_state_dict(state["g_ema"])
    return g.to(device).eval().requires_grad_(False)


@torch.no_grad()
def sample_images(g: Generator, n: int, rng: torch.Generator, *, psi: float = 1.0, batch: int = 64) -> torch.Tensor:
    """``n`` images ``(n, 3, S, S)`` in [-1, 1] from generator ``g`` (z and noise from ``rng``)."""
    device = next(g.parameters()).device
    out = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        z = torch.randn(m, g.cfg.z_dim, generator=rng, device=device)
        out.append(g(z, psi=psi, noise_generator=rng).clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 3, g.cfg.size, g.cfg.size)


def kimg(nimg: int) -> float:
    return round(nimg / 1000, 3)


