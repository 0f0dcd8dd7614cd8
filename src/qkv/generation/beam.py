"""Beam search: keep the ``num_beams`` best partial hypotheses per row, scored by log P(Y) / lp(Y) with GNMT's
length penalty lp(Y) = ((5 + |Y|) / 6)^alpha (alpha 0.6 in "Attention Is All You Need")."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..models import unwrap
from .config import GenerationConfig, resolve
from .logits import process
from .prompt import Prompt, Stepper, check_fits, evaluating, prepare

__all__ = ["beam_search", "gnmt_length_penalty", "search"]


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016, GNMT); a hypothesis scores log P(Y) / lp(Y)."""
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(model: nn.Module, ids: Tensor, max_new_tokens: int | None = None, *,
                config: GenerationConfig | None = None, attention_mask: Tensor | None = None,
                return_scores: bool = False, **options: Any) -> Tensor | tuple[Tensor, Tensor]:
    """Keep the ``num_beams`` best partial hypotheses per row; → the best finished one, as :func:`generate` does.

    A hypothesis Y scores log P(Y | prompt) / lp(Y), lp(Y) = ((5 + |Y|) / 6)^alpha with alpha =
    ``length_penalty`` (0.6 by default, GNMT; |Y| counts the generated tokens, the stop token included).
    A hypothesis is finished when it ends in a stop token, or at ``max_new_tokens``. With ``early_stopping``
    a row is done as soon as it holds ``num_beams`` finished hypotheses; without, once no live hypothesis can
    still beat the worst of them. Deterministic: temperature, top-k, top-p and seed do not apply; the
    repetition penalty and min_new_tokens do. ``return_scores=True`` also returns each row's best score.
    The model may be wrapped by peft, torch.compile, DDP or FSDP.
    """
    cfg = resolve(config, max_new_tokens, options)
    return search(model, prepare(model, ids, attention_mask, cfg), cfg, return_scores=return_scores)


def search(model: nn.Module, prompt: Prompt, cfg: GenerationConfig, *, return_scores: bool = False
           ) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`beam_search` on a prepared prompt."""
    if cfg.stop_strings:
        raise ValueError("stop_strings work with sampling and greedy decoding (num_beams=1); beam search stops "
                         "on stop_token_ids")
    check_fits(model, prompt, cfg)
    n_batch, beams, vocab = prompt.ids.shape[0], cfg.num_beams, unwrap(model).config.vocab_size
    device, n_new = prompt.ids.device, cfg.max_new_tokens
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n_batch)]
    if n_new == 0:
        return (prompt.start.clone(), torch.zeros(n_batch)) if return_scores else prompt.start.clone()
    stop_set = set(prompt.stop)
    with evaluating(model), torch.inference_mode():
        expand = torch.arange(n_batch, device=device).repeat_interleave(beams)  # row b*beams + j → prompt b
        mask = None if prompt.mask is None else prompt.mask[expand]
        stepper = Stepper(model, prompt.ids[expand], mask, n_new, cfg.use_cache, bool(cfg.sliding_window))
        stop_ids = torch.tensor(prompt.stop, dtype=torch.long, device=device) if prompt.stop else None
        seen = prompt.seen_tokens(vocab)[expand] if cfg.repetition_penalty != 1.0 else None
        start = prompt.target_start
        logits = stepper.prefill(None if start is None else start[expand])
        scores = torch.full((n_batch, beams), float("-inf"), device=device)
        scores[:, 0] = 0.0  # at first every beam holds the same prompt: expand only one of them
        history = torch.empty(n_batch * beams, 0, dtype=torch.long, device=device)
        done = [False] * n_batch
        n_candidates = min(beams * (1 + len(stop_set)), beams * vocab)  # enough to find `beams` live ones
        for step in range(n_new):
            log_probs = process(logits, step, cfg, seen, stop_ids).float().log_softmax(-1)
            total = (scores.unsqueeze(-1) + log_probs.view(n_batch, beams, vocab)).view(n_batch, -1)
            top_scores, top_index = total.topk(n_candidates, dim=-1)
            rows, tokens, new_scores = [], [], []
            hist: list[list[int]] = []  # the hypotheses as lists, converted only when one finishes
            for b, (row_scores, row_index) in enumerate(zip(top_scores.tolist(), top_index.tolist(), strict=True)):
                live: list[tuple[int, int, float]] = []
                if not done[b]:
                    for rank, (score, index) in enumerate(zip(row_scores, row_index, strict=True)):
                        if score == float("-inf") or len(live) == beams:
                            break
                        beam, token = divmod(index, vocab)
                        if token in stop_set:
                            if rank < beams:  # a stop token among the best `beams` candidates ends a hypothesis
                                hist = hist or history.tolist()
                                hyp = hist[b * beams + beam] + [token]
                                finished[b].append((score / gnmt_length_penalty(len(hyp), cfg.length_penalty),
                                                    hyp))
                        else:
                            live.append((b * beams + beam, token, score))
                    done[b] = _beam_row_done(finished[b], live, step, cfg)
                while len(live) < beams:  # a finished row (or too few candidates): filler nobody extends
                    live.append((b * beams, prompt.pad, float("-inf")))
                for row, token, score in live:
                    rows.append(row)
                    tokens.append(token)
                    new_scores.append(score)
            if all(done):
                break
            index = torch.tensor(rows, device=device)
            token_t = torch.tensor(tokens, device=device)
            history = torch.cat([history[index], token_t.unsqueeze(1)], dim=1)
            scores = torch.tensor(new_scores, device=device).view(n_batch, beams)
            if seen is not None:
                seen = seen[index]
                seen[torch.arange(len(rows), device=device), token_t] = True
            if step + 1 == n_new:
                break
            stepper.reorder(index)
            logits = stepper.step(token_t.unsqueeze(1))
        hist = history.tolist()
        for b in range(n_batch):
            if not done[b]:  # out of steps: the live hypotheses compete too
                for j in range(beams):
                    score = float(scores[b, j])
                    if score > float("-inf"):
                        hyp = hist[b * beams + j]
                        finished[b].append((score / gnmt_length_penalty(len(hyp), cfg.length_penalty), hyp))
    best = [max(hyps, key=lambda h: h[0]) for hyps in finished]
    longest = max(len(h) for _, h in best)
    out = torch.full((n_batch, longest), prompt.pad, dtype=torch.long, device=device)
    for b, (_, hyp) in enumerate(best):
        out[b, : len(hyp)] = torch.tensor(hyp, dtype=torch.long)
    out = torch.cat([prompt.start, out], dim=1)
    return (out, torch.tensor([s for s, _ in best])) if return_scores else out


def _beam_row_done(finished: list[tuple[float, list[int]]], live: list[tuple[int, int, float]], step: int,
                   cfg: GenerationConfig) -> bool:
    """Is this row's search over? Needs num_beams finished hypotheses, and (without early stopping) no live
    one that could still beat the worst of the best num_beams: log P only falls as Y grows, so a live score
    s can at best become s / lp(max_new_tokens) (alpha > 0) or s / lp(now) (alpha = 0)."""
    if len(finished) < cfg.num_beams:
        return False
    if cfg.early_stopping or not live:
        return True
    worst_kept = sorted((s for s, _ in finished), reverse=True)[cfg.num_beams - 1]
    best_live = max(s for _, _, s in live)
    length = cfg.max_new_tokens if cfg.length_penalty > 0 else step + 1
    return best_live / gnmt_length_penalty(length, cfg.length_penalty) <= worst_kept
