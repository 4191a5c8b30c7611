"""Evidence: the scales the notebooks run at, the claims they test (as data), the featured configuration and its
variants, and verdicts computed from seeds and test images.

* :mod:`.scales`: ``test`` (checks the code, claims nothing) and ``demonstration`` (decides the claims);
* :mod:`.variants`: the featured ``EndoARSS`` configuration, said once, and the named variants;
* :mod:`.claims`: every tested claim and :func:`decide` / :func:`sentence`;
* :mod:`.outcomes`: metrics recomputed from a run's per-image test outcomes (for bootstrap resamples);
* :mod:`.stats`: the seed interval, the bootstrap interval and the verdict rule;
* :mod:`.ceiling`: the patch-grid ceiling of segmentation at a token grid.
"""
from .claims import CLAIMS, NOT_DECIDED, Claim, Verdict, claims_for, claims_frame, decide, get_claim, sentence
from .scales import SCALES, Scale, get_scale
from .variants import FEATURED, FEATURED_FIELDS, FEATURED_MODEL, VARIANTS, pick, variant_options

__all__ = ["CLAIMS", "NOT_DECIDED", "Claim", "Verdict", "claims_for", "claims_frame", "decide", "get_claim",
           "sentence", "SCALES", "Scale", "get_scale", "FEATURED", "FEATURED_FIELDS", "FEATURED_MODEL", "VARIANTS",
           "pick", "variant_options"]
