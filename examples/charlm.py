"""The small character-level LM the DiLoCo examples train: :mod:`pccl.tools.charlm`.

It ships with pccl (``pccl demo`` runs it from an installed package); ``import charlm`` next to
the examples gives that module.
"""

import sys

from pccl.tools import charlm

sys.modules[__name__] = charlm
