"""ecp_fast: elimination-compensation pruning (ECP) for PyTorch.

Fused ops (``torch.ops.ecp.moments``, ``ecp.score``, ``ecp.finalize``) compute, for every weight of
a layer at once, the importance that already accounts for the best shift of its neuron's bias;
see ``ecp_fast.ops`` for the contract and ``ecp_fast.reference`` for the plain-PyTorch oracle.
"""

from ecp_fast.moments import Moments, merge_moments
from ecp_fast.ops import finalize, moments, score

__version__ = "0.1.0"

__all__ = ["Moments", "finalize", "merge_moments", "moments", "score", "__version__"]
