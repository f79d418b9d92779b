"""Training objectives behind one interface (:class:`Estimator`, on a narrow :class:`Context`):
PCD, JEM, CD-k, score matching, NCE, adversarial and KSD, built by ``build_estimator``. The loss
functions take energies or logits (computed through the wrapped model) and return a scalar loss
plus a dict of detached statistics."""
from ebmscale.objectives.base import Context, Estimator, Streams
from ebmscale.objectives.estimators import ESTIMATOR_KINDS, build_estimator, estimator_class
from ebmscale.objectives.jem import jem_loss
from ebmscale.objectives.pcd import pcd_loss

__all__ = ["pcd_loss", "jem_loss", "build_estimator", "estimator_class", "Estimator", "Context", "Streams",
           "ESTIMATOR_KINDS"]
