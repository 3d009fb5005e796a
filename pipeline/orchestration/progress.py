"""Training progress as a few log lines: not one per epoch, with elapsed time and what is left."""

from __future__ import annotations

import time
from collections.abc import Callable

from vae import EpochStats
from vae.terms import TERMS, column

EVERY_S = 30.0  # at most this long between two lines
SHARE = 0.1  # or this share of a stage's epochs


def clock_text(seconds: float) -> str:
    """3:05, 1:02:09: minutes and seconds, hours when there are any."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class TrainingProgress:
    """An on_epoch callback that emits a line for the first and last epoch of each stage, when the
    noise head opens (model.noise_by_z), when the refit on all rows begins (train.refit), and
    otherwise after EVERY_S seconds or SHARE of the stage's epochs, whichever comes first."""

    def __init__(self, emit: Callable[[str], None], every_s: float = EVERY_S, share: float = SHARE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.emit, self.every_s, self.share, self.clock = emit, every_s, share, clock
        self.started = clock()
        self.phase = ""
        self.stage_seconds = 0.0  # the stage's epochs' own time (a resumed run starts its count here)
        self.stage_counted = 0
        self.last_time, self.last_epoch = self.started, 0  # of the last line
        self.seen = 0  # the last epoch seen

    def __call__(self, s: EpochStats) -> None:
        now = self.clock()
        if s.phase != self.phase:
            if s.phase == "refit":
                self.emit(f"selection over after {self.seen} epochs; refit on all rows (train.refit) for "
                          f"{s.stage_epochs} epochs")
            self.phase, self.stage_seconds, self.stage_counted = s.phase, 0.0, 0
            self.last_time, self.last_epoch = now, 0
            first = True
        else:
            first = False
        self.stage_seconds += s.seconds
        self.seen = s.epoch
        self.stage_counted += 1
        step = max(1, round(self.share * s.stage_epochs))
        due = now - self.last_time >= self.every_s or s.epoch // step > self.last_epoch // step
        if first or due or s.stage_over or s.noise_opened:
            self.emit(self.line(s, now))
            self.last_time, self.last_epoch = now, s.epoch
        if s.noise_opened:
            then = ("as in the selection" if s.phase == "refit"
                    else "training goes on with fresh early-stopping patience")
            self.emit(f"epoch {s.epoch}: the z-dependent noise scales open (model.noise_by_z); {then}")

    def line(self, s: EpochStats, now: float) -> str:
        stage = "refit on all rows, epoch" if s.phase == "refit" else "epoch"
        val = "" if s.val_elbo is None else f"  val ELBO {s.val_elbo:.3f}"
        head = f"{stage} {s.epoch}/{s.stage_epochs}  {terms_text(s, headline=True)}{val}"
        elapsed = f"{clock_text(now - self.started)} elapsed"
        if s.stage_over:
            return f"{head}  ({elapsed}; {'refit' if s.phase == 'refit' else 'selection'} done)"
        left = max(0, s.stage_epochs - s.epoch) * self.stage_seconds / max(self.stage_counted, 1)
        bound = "at most " if s.phase == "select" else ""  # early stopping may end the selection sooner
        return f"{head}  ({elapsed}, {bound}{clock_text(left)} left in this stage)"


def terms_text(s: EpochStats, headline: bool = False) -> str:
    """The epoch's training terms: "ELBO -5.000  recon -4.000  KL 1.000"; headline: those a log line shows."""
    return "  ".join(f"{t.label} {getattr(s, column('train', t)):.3f}" for t in TERMS if t.headline or not headline)


def epoch_line(s: EpochStats, epochs: int) -> str:
    """One epoch, as the terminal's rewritten progress line shows it."""
    val = "" if s.val_elbo is None else f"  val ELBO {s.val_elbo:.3f}"
    if s.phase == "refit":  # its length is the epoch count early stopping chose
        return f"refit on all rows, epoch {s.epoch}  {terms_text(s)}"
    return f"epoch {s.epoch}/{epochs}  {terms_text(s)}{val}"
