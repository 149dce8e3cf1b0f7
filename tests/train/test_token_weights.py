"""`train.loss.token_weights`: extra loss weight at positions that predict chosen tokens (stage 3
of the learning check weighs the token that opens an SC answer's region list)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.batch import IGNORE_INDEX
from sr_jax.data.vocab import VocabMap, VocabMissError, tokenizer_identity
from sr_jax.train.loss import label_loss, resolve_token_weights


def _case(seed=0, b=2, t=12, h=8, v=11):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(h, v)), jnp.float32)
    labels = rng.integers(0, v, (b, t))
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[1, 9:] = IGNORE_INDEX
    return hidden, w, jnp.asarray(labels)


@pytest.mark.parametrize("weighting", ["token", "example"])
def test_weighted_loss_equals_the_hand_computed_weighted_mean(weighting):
    hidden, w, labels = _case()
    weights = ((3, 10.0), (7, 0.5))
    stats = label_loss(lambda x: x @ w, hidden, labels, weighting=weighting, token_weights=weights)
    logp = np.asarray(jax.nn.log_softmax(hidden @ w, axis=-1))
    lab = np.asarray(labels)
    total, norm, n_examples = 0.0, 0.0, 0
    for row in range(lab.shape[0]):
        positions = [p for p in range(lab.shape[1] - 1) if lab[row, p + 1] >= 0]
        n_examples += 1
        for p in positions:
            target = lab[row, p + 1]
            factor = dict(weights).get(int(target), 1.0)
            base = 1.0 if weighting == "token" else 1.0 / len(positions)
            total += -logp[row, p, target] * factor * base
            norm += factor * base
    assert {int(x) for x in lab[lab >= 0]} & {3, 7}  # the case has weighted targets
    np.testing.assert_allclose(float(stats.loss_sum), total, rtol=1e-5)
    np.testing.assert_allclose(float(stats.weight), norm if weighting == "token" else n_examples, rtol=1e-6)
    plain = label_loss(lambda x: x @ w, hidden, labels, weighting=weighting)
    assert float(plain.loss_sum) != pytest.approx(float(stats.loss_sum))
    assert float(plain.tokens) == float(stats.tokens)


def test_token_texts_resolve_to_model_ids(tokenizer):
    opens = {' [],': 10.0, ' [{"': 5.0}  # how an SC answer's region list opens: empty / not
    full = resolve_token_weights(opens, tokenizer)
    assert [tokenizer.decode([i]) for i, _ in full] == list(opens) and [w for _, w in full] == [10.0, 5.0]
    assert tokenizer.encode('{"edit_region": [], "reasoning"')[4] == full[0][0]
    vmap = VocabMap({full[0][0], full[1][0], 0, 5, 77}, tokenizer_identity(tokenizer), tokenizer=tokenizer)
    compact = resolve_token_weights(opens, tokenizer, vmap)
    assert [vmap.to_full(np.asarray([i]))[0] for i, _ in compact] == [i for i, _ in full]
    with pytest.raises(ValueError, match="'edit_region' is 2 tokens"):
        resolve_token_weights({"edit_region": 2.0}, tokenizer)
    with pytest.raises(ValueError, match="must be > 0"):
        resolve_token_weights({' [],': 0}, tokenizer)
    with pytest.raises(VocabMissError):
        resolve_token_weights({" red": 2.0}, tokenizer, vmap)

