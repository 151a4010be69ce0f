"""Rule-based rewards for math reasoning.

`grading` is the pure, torch-free API (also used by evaluation); `math_reward.py` is the OpenRLHF entry
point (`--reward.remote_url openrlhf_sapo/rewards/math_reward.py`), not imported here so that importing
the grading API does not import torch.
"""

from openrlhf_sapo.rewards.grading import (  # noqa: F401
    ANSWER_TYPES,
    check_verifier,
    DEFAULT_FORMAT_WEIGHT,
    DEFAULT_TIMEOUT_S,
    configure_verifier,
    extract_final_answer,
    format_score,
    is_equivalent,
    last_assistant_turn,
    response_from_query,
    score_response,
    score_responses,
    shutdown_verifier,
)
