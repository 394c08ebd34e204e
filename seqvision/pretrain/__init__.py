"""TokenUnify pretraining of EM encoders (docs/PRETRAINING.md).

* :mod:`~seqvision.pretrain.tokenunify` - ``TokenUnify``: the three token objectives (random token
  prediction, next token, next-all) around an EM encoder, joint / alternate / sequential.
* :mod:`~seqvision.pretrain.train` - ``pretrain(config)``: a YAML config to a trained encoder
  (``encoder.safetensors``) on the shared loop (``seqvision pretrain``).

The EM volumes it reads and the synthetic ones are :mod:`seqvision.data`.
"""

from .tokenunify import TokenUnify
from .train import ENCODER_FILE, load_config, pretrain

__all__ = ["ENCODER_FILE", "TokenUnify", "load_config", "pretrain"]
