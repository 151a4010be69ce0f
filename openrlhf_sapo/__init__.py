"""SAPO (Segment-Aligned Policy Optimization) as an extension of OpenRLHF.

`openrlhf_sapo.algo` holds the algorithm as pure torch; everything that touches
OpenRLHF, Ray or DeepSpeed lives outside it.
"""

__version__ = "0.1.0"

# The upstream release this package extends; checked where upstream is imported.
OPENRLHF_VERSION = "0.11.2"
