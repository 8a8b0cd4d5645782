"""DiLoCo across local peers with churn: :mod:`pccl.tools.diloco_charlm` (shipped with pccl, so
``pccl demo`` runs it from an installed package).

    python examples/diloco_charlm.py                      # 3 peers, sync DiLoCo, uint8
    python examples/diloco_charlm.py --delayed --churn    # async DiLoCo, a peer killed + a newcomer
    python examples/diloco_charlm.py --peer ...           # one peer configured from PCCL_* env

``import diloco_charlm`` next to the examples gives that module.
"""

import sys

from pccl.tools import diloco_charlm

if __name__ == "__main__":
    sys.exit(diloco_charlm.main())
sys.modules[__name__] = diloco_charlm
