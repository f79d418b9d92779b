"""Training objectives. Each takes energies or logits (computed through the wrapped model) and
returns a scalar loss plus a dict of detached statistics to report."""
from ebmscale.objectives.jem import jem_loss
from ebmscale.objectives.pcd import pcd_loss

__all__ = ["pcd_loss", "jem_loss"]
