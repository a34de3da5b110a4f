"""Reward for the multi-process arm matrix (not a test module): about one completion in six scores 1, by a hash
of its text, so about half the groups of four have reward variance and the pass-rate probe predicts skip
probabilities near 1/2 (p^4 + (1 - p)^4 for p = 1/6), where ranks' own skip draws differ most. The same text
scores the same on every rank."""

import hashlib


def one_in_six(completions, **_):
    texts = [str(completion) for completion in completions]
    return [float(int(hashlib.sha256(text.encode()).hexdigest(), 16) % 6 == 0) for text in texts]
