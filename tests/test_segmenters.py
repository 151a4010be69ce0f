"""Text-driven segmenters (step regex, newline table) on real token texts."""

import re

import pytest
import torch

from openrlhf_sapo.algo import newline_segment_ends, newline_token_table, step_segment_ends, token_text_table

# A tiny vocabulary in which step markers are split across tokens in different ways.
VOCAB = ["Step", " ", "1", "2", ":", " add", ".\n", "\nStep", "Ste", "p 3", "x", "S"]


def encode(pieces):
    return [VOCAB.index(p) for p in pieces]


def batch(rows, T=None):
    T = T or max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(encode(r))
        mask[i, : len(r)] = True
    return ids, mask


def ends_of(rows, **kw):
    ids, mask = batch(rows)
    return [torch.nonzero(row).flatten().tolist() for row in step_segment_ends(ids, mask, VOCAB, **kw)]


def loop_step_ends(pieces, pattern=r"Step \d+"):
    """Straightforward reference: cut before the token holding each match's first character."""
    text, owner = "", []
    for i, p in enumerate(pieces):
        text += p
        owner += [i] * len(p)
    starts = {owner[m.start()] for m in re.finditer(pattern, text)}
    return sorted({s - 1 for s in starts if s > 0} | {len(pieces) - 1})


@pytest.mark.parametrize(
    "pieces",
    [
        ["Step", " ", "1", ":", " add", ".\n", "Step", " ", "2", ":", " add"],  # marker over three tokens
        ["x", "\nStep", " ", "2", " add", "Ste", "p 3", " add"],  # marker mid-token, marker split in two
        ["Step", " ", "1", " add"],  # marker on the first token: no cut before it
        ["x", "S", "x", "Step", "x", "1"],  # near misses
        ["x"],
    ],
)
def test_step_ends_match_a_loop_over_the_text(pieces):
    assert ends_of([pieces]) == [loop_step_ends(pieces)]


def test_no_match_spans_two_responses():
    # Row 0 ends in "Ste", row 1 starts with "p 3": joined they would read "Step 3".
    assert ends_of([["x", "Ste"], ["p 3", "x"]]) == [[1], [1]]


def test_step_with_gaps_in_the_mask_cuts_at_the_previous_valid_token():
    ids = torch.tensor([encode(["x", "x", " add", "Step", " ", "1"])])
    mask = torch.tensor([[True, True, False, True, True, True]])
    assert torch.nonzero(step_segment_ends(ids, mask, VOCAB)[0]).flatten().tolist() == [1, 5]


def test_custom_pattern_and_batch_rows_are_independent():
    rows = [["x", "\nStep", " ", "1"], ["x", ".\n", "x"], ["Ste", "p 3"]]
    assert ends_of(rows, pattern=r"\n") == [loop_step_ends(r, r"\n") for r in rows]


def test_tables_from_a_real_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {ch: i for i, ch in enumerate(["a", "b", "\n", "S", "t", "e", "p", " ", "1"])}
    model = tokenizers.models.BPE(vocab=vocab, merges=[])
    tok = tokenizers.Tokenizer(model)
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    texts = token_text_table(hf)
    assert texts == list(vocab)
    table = newline_token_table(texts)
    assert table.tolist() == [t == "\n" for t in vocab]
    ids = torch.tensor([hf.encode("ab\nab\nS")])
    ends = newline_segment_ends(ids, torch.ones_like(ids, dtype=torch.bool), table)
    assert torch.nonzero(ends[0]).flatten().tolist() == [2, 5, 6]
    step = step_segment_ends(ids, torch.ones_like(ids, dtype=torch.bool), texts, pattern=r"\nS")
    assert torch.nonzero(step[0]).flatten().tolist() == [4, 6]
