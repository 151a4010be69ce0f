"""Evaluate a model on the paper's math benchmarks: ``python -m openrlhf_sapo.eval``.

    python -m openrlhf_sapo.eval --model ckpt/sapo_7b --output-dir eval/sapo_7b \\
        --benchmarks geo3k=data/geo3k/test.jsonl mathvista=bench/mathvista.jsonl data/gsm8k \\
        --n-samples 4 --compare-paper 7b --label "SAPO (ours)"

Benchmarks are jsonl files in one common format (see `openrlhf_sapo.eval.benchmarks`); the outputs
of `openrlhf_sapo.data.*` load as they are. Generation uses vLLM on GPU or Hugging Face `generate`
(`openrlhf_sapo.eval.generate`), sampling at temperature 0.6 / top-p 0.95 (the paper's evaluation)
unless told otherwise. Each response is graded by `openrlhf_sapo.rewards.grading.score_responses`
with format weight 0: correct iff the last ``\\boxed{}`` is equivalent to the label; a response
without one scores 0.

Outputs in ``--output-dir``:

* ``samples.jsonl``: one line per generation (benchmark, id, sample index, prompt, label, response,
  extracted answer, correct, reason, token count), written as the run goes;
* ``results.json``: per benchmark metrics (see `openrlhf_sapo.eval.report`), the averages, the
  configuration and the model path;
* ``table.md``: the paper's Table 1 layout (Geo3K, LogicVista, MathVerse, WeMath, MathVista,
  DynaMath, Avg), a second table for GSM8K / MATH500, optional published rows of the paper
  (``--compare-paper 3b|7b``), and per-benchmark details.

Exit codes: 0 done, 2 bad arguments or input (message names the file and row).
"""

from openrlhf_sapo.eval.evaluate import (
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    build_parser,
    main,
    run,
    score_generations,
)

__all__ = ["EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "main", "run", "score_generations"]
