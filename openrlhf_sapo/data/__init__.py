"""Data preparation: turn Geo3K, GSM8K and MATH into OpenRLHF prompt datasets (jsonl).

    python -m openrlhf_sapo.data.geo3k --output-dir data/geo3k
    python -m openrlhf_sapo.data.gsm8k --output-dir data/gsm8k
    python -m openrlhf_sapo.data.math  --output-dir data/math

Each writes one ``<split>.jsonl`` per split (Geo3K also ``images/<split>/<row>.png``) with the keys
``prompt``, ``label`` (, ``images``), ``answer_type``, ``datasource``, ``source``, ``id``, and prints
the OpenRLHF flags that read them. The shared parts: ``sources`` (reading), ``images``, ``rows``
(validation, output rows) and ``common`` (the run and the command line; it re-exports the others).
Submodules are not imported here, so ``import openrlhf_sapo.data`` stays cheap.
"""
