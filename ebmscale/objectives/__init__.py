"""Training objectives. Each takes energies or logits (computed through the wrapped model) and
returns a scalar loss plus a dict of detached statistics to report. The estimators beyond PCD/JEM
(CD-k, score matching, NCE, adversarial, KSD) plug into the trainer through ``build_estimator``."""
from ebmscale.objectives.estimators import ESTIMATOR_KINDS, Estimator, build_estimator
from ebmscale.objectives.jem import jem_loss
from ebmscale.objectives.pcd import pcd_loss

__all__ = ["pcd_loss", "jem_loss", "build_estimator", "Estimator", "ESTIMATOR_KINDS"]
