"""mtp: language models that think in more than one token per forward pass.

Shape letters, one meaning each, used as name suffixes (`logits_btv`) and in docstrings:

    B  batch rows                       T  positions (a sequence, a prompt, a rollout)
    V  vocabulary                       D  model width
    K  drafts per pass (drafter.k)      J  draft step (0..K-1)
    L  tapped layers (model.taps)       F  feed-forward width
    N  query heads                      G  key/value heads
    H  head dim                         S  KV cache slots (registers + max_len)
    W  tokens fed per main pass         O  output slots of a decode call (max_len)
    P  passes of a rollout              R  registers
    U  draft vocabulary (drafter.draft_vocab; V unless trimmed)
"""
