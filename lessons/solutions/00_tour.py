"""Solutions to lesson 0."""


def accuracy(logits, labels):
    """logits (B, K), labels (B,) -> fraction of correct predictions."""
    return (logits.argmax(axis=1) == labels).mean()
