"""OpenAI's `logit_bias`: per-row additive biases on chosen token ids' logits."""
