"""The two scales every notebook runs at: ``test`` checks code paths, ``demonstration`` decides claims.

* ``test`` (the notebooks' default, what CI and nbval run): a few dozen small synthetic images, a few epochs, one
  seed. It exercises every code path and claims nothing: every caption says TEST SCALE, every verdict is
  ``not decided (test scale)``.
* ``demonstration`` (``make executed``; the committed executed notebooks, the book, ``results/tables/claims.csv``
  and the README's numbers): 240 training and 96 test synthetic images at 224 px (the paper's 16 x 16 token grid at
  patch 14), ``epochs`` epochs on a cosine learning-rate schedule (the epoch with the best validation score is
  selected; early stopping on a 47-image validation split stopped runs on noise while segmentation still improved),
  three seeds; verdicts are computed from the seeds and the test images (:mod:`.claims`).

A notebook parameter left at ``None`` takes its scale's value; one given explicitly wins (and is recorded).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Scale", "SCALES", "get_scale"]


@dataclass(frozen=True)
class Scale:
    name: str
    image_size: int
    n_train: int  # synthetic training images (the validation split is carved from them)
    n_test: int
    epochs: int  # the most epochs
    patience: int  # early stopping on the validation score (0: off)
    scheduler: str  # the learning-rate schedule (TrainConfig.scheduler)
    seeds: tuple[int, ...]
    diagnostics_every: int  # task-gradient conflict every k steps (the same for every run of a scale: runs are shared)
    decides: bool  # whether verdicts are computed (False: "not decided (test scale)")
    purpose: str
    corruptions: tuple[str, ...] | None = None  # the robustness study's corruptions (None: all 19)
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)  # and severities

    def caption(self) -> str:
        """What a table at this scale is (every caption starts with it)."""
        if not self.decides:
            return (f"TEST SCALE (checks the code; not evidence: {self.n_train} / {self.n_test} images at "
                    f"{self.image_size} px, {self.epochs} epochs, seed(s) {list(self.seeds)})")
        stopping = f"up to {self.epochs} epochs with early stopping (patience {self.patience})" if self.patience \
            else f"{self.epochs} epochs"
        schedule = f", {self.scheduler} learning-rate schedule" if self.scheduler != "none" else ""
        return (f"DEMONSTRATION SCALE ({self.n_train} / {self.n_test} images at {self.image_size} px, {stopping}"
                f"{schedule}, best validation epoch, seeds {list(self.seeds)})")

    def to_dict(self) -> dict:
        return asdict(self)


SCALES: dict[str, Scale] = {
    "test": Scale("test", image_size=84, n_train=48, n_test=24, epochs=6, patience=0, scheduler="none",
                  seeds=(0,), diagnostics_every=2,
                  decides=False, purpose="checks every code path in minutes (CI, nbval); claims nothing",
                  corruptions=("gaussian_noise", "motion_blur", "smoke", "elastic_transform"), severities=(1, 5)),
    "demonstration": Scale("demonstration", image_size=224, n_train=240, n_test=96, epochs=12, patience=0,
                           scheduler="cosine", seeds=(0, 1, 2), diagnostics_every=10, decides=True,
                           purpose="decides the claims: 3 seeds, the paper's 16 x 16 token grid, 12 cosine epochs",
                           corruptions=None, severities=(1, 3, 5)),
}


def get_scale(name: str) -> Scale:
    """The scale ``name`` (ValueError listing the scales)."""
    if name not in SCALES:
        raise ValueError(f"scale={name!r}: expected one of {list(SCALES)} (test: checks the code, claims nothing; "
                         "demonstration: decides the claims)")
    return SCALES[name]
