"""Mining on planted embeddings (known answers), the false-negative filter, the sidecar checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sde_ray.data.negatives import Sidecar, check_sidecar, mine_negatives

DIM = 16


def _unit(rng, n):
    x = rng.standard_normal((n, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_planted_hard_negatives_are_mined_exactly():
    rng = np.random.default_rng(1)
    n = 20
    # Orthonormal queries: a target's cosine to a query comes only from what is planted.
    queries = np.linalg.qr(rng.standard_normal((2 * n, n)))[0].T
    # Target i: mostly query i (the positive); target hard[i] carries a large share of query i too.
    hard = rng.permutation(n)
    while np.any(hard == np.arange(n)):
        hard = rng.permutation(n)
    targets = 0.9 * queries.copy()
    for i in range(n):
        targets[hard[i]] += 0.55 * queries[i]
    hashes = [f"h{i}" for i in range(n)]
    negatives, scores, positive, counts = mine_negatives(queries, targets, hashes, range(n), top_k=1, margin=0.05)
    np.testing.assert_array_equal(negatives[:, 0], hard)
    assert counts.dropped["positive"] == n and counts.kept == n and counts.short == 0
    # The scores are the cosines, computed here directly.
    t = targets / np.linalg.norm(targets, axis=1, keepdims=True)
    np.testing.assert_allclose(scores[:, 0], np.einsum("nd,nd->n", queries, t[hard]), rtol=1e-5)
    np.testing.assert_allclose(positive, np.einsum("nd,nd->n", queries, t), rtol=1e-5)


def test_filter_removes_planted_duplicates_and_near_positives():
    rng = np.random.default_rng(2)
    q0, q1, q2, q3, b0, b1, b2, b3, b5 = np.linalg.qr(rng.standard_normal((DIM, 9)))[0].T
    queries = np.stack([q0, q1, q2, q3])
    # Rows 0-3: paired targets at cosine 0.8 to their query, 0 to the others. Row 4's target is a
    # copy of row 0's content (same id "a"); row 5's is query 1 itself (above its positive: within
    # the margin); rows 2 and 3 share the content id "c".
    targets = np.stack([0.8 * q0 + 0.6 * b0, 0.8 * q1 + 0.6 * b1, 0.8 * q2 + 0.6 * b2, 0.8 * q3 + 0.6 * b3,
                        q0, q1 + 0.01 * b5])
    hashes = ["a", "b", "c", "c", "a", "e"]
    negatives, _, positive, counts = mine_negatives(queries, targets, hashes, range(4), top_k=5, margin=0.05)
    mined = [[int(j) for j in row if j >= 0] for row in negatives]
    # By hand: each row keeps one target per other content id (which copy depends on rounding of
    # the zero cosines), never its own content, never row 5 for query 1.
    assert [{hashes[j] for j in row} for row in mined] == [{"b", "c", "e"}, {"a", "c"}, {"a", "b", "e"},
                                                           {"a", "b", "e"}]
    assert 4 not in mined[0] and 5 not in mined[1] and 3 not in mined[2] and 2 not in mined[3]
    assert counts.dropped == {"positive": 4, "same_content": 3, "within_margin": 1, "duplicate_candidate": 5}
    assert counts.kept == 11 and counts.short == 4
    np.testing.assert_allclose(positive, 0.8, rtol=1e-6)


def test_within_subset_search_stays_in_the_group():
    rng = np.random.default_rng(3)
    queries, targets = _unit(rng, 10), _unit(rng, 10)
    groups = ["x"] * 5 + ["y"] * 5
    negatives, _, _, _ = mine_negatives(queries, targets, [str(i) for i in range(10)], range(10), 3, 2.0,
                                        groups=groups)
    for i, row in enumerate(negatives):
        assert all(groups[j] == groups[i] for j in row if j >= 0)



def _walk(queries, targets, hashes, top_k, margin, groups):
    """The filter as a plain walk, query by query, over every candidate in (score desc, index) order:
    the reference the vectorised `mine_negatives` must reproduce, counts included."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    t = targets / np.linalg.norm(targets, axis=1, keepdims=True)
    chosen, dropped = [], dict.fromkeys(("positive", "same_content", "within_margin", "duplicate_candidate"), 0)
    for i in range(len(q)):
        scores = (t @ q[i]).astype(np.float32)
        kept, ids = [], set()
        for j in sorted(range(len(t)), key=lambda j: (-scores[j], j)):
            if groups is not None and groups[j] != groups[i]:
                continue
            reason = ("positive" if j == i else "same_content" if hashes[j] == hashes[i]
                      else "within_margin" if scores[j] > scores[i] - margin
                      else "duplicate_candidate" if hashes[j] in ids else None)
            if reason:
                dropped[reason] += 1
                continue
            kept.append(j)
            ids.add(hashes[j])
            if len(kept) == top_k:
                break
        chosen.append(kept)
    return chosen, dropped


@pytest.mark.parametrize("margin", [0.05, 0.6])
@pytest.mark.parametrize("within_subset", [False, True])
def test_vectorised_filter_matches_the_walk_on_a_planted_corpus(margin, within_subset):
    rng = np.random.default_rng(4)
    n, subsets = 600, 3
    # Classification-like corpus: a third of the targets repeat one of 12 labels (content ids and
    # vectors shared), the rest are unique; queries lie near their targets. margin=0.6 mimics a weak
    # teacher: most candidates fall within the margin and many walks run past the first head of
    # 8·top_k + 32 candidates (the widening path).
    labels = rng.normal(size=(12, DIM))
    label_of = np.where(np.arange(n) % 3 == 0, rng.integers(0, 12, n), -1)
    targets = np.where(label_of[:, None] >= 0, labels[np.maximum(label_of, 0)], rng.normal(size=(n, DIM)))
    queries = targets + 0.8 * rng.normal(size=(n, DIM))
    hashes = [f"label{label}" if label >= 0 else f"row{i}" for i, label in enumerate(label_of)]
    groups = [i % subsets for i in range(n)] if within_subset else None
    negatives, scores, _, counts = mine_negatives(queries, targets, hashes, range(n), top_k=4, margin=margin,
                                                  groups=groups, block=128)
    chosen, dropped = _walk(queries, targets, hashes, 4, margin, groups)
    # Copies of one label tie exactly here but not always in float32's last bit (the blocked matrix
    # product): compare the mined content ids, in score order, not which copy carries them.
    assert [[hashes[j] for j in row if j >= 0] for row in negatives] == [[hashes[j] for j in c] for c in chosen]
    assert counts.dropped == dropped
    assert counts.kept == sum(map(len, chosen)) and counts.short == sum(len(c) < 4 for c in chosen)
    t = targets / np.linalg.norm(targets, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for i, row in enumerate(negatives):
        found = row[row >= 0]
        np.testing.assert_allclose(scores[i, :len(found)], t[found] @ q[i], atol=1e-5)
        assert np.isnan(scores[i, len(found):]).all()
    if margin > 0.5:
        assert dropped["within_margin"] > 40 * n  # the widening path was taken


def test_sidecar_keys_must_match_the_shards():
    sidecar = Sidecar({"a": ["b"], "b": ["a"]}, {"a": [0.5], "b": [0.4]}, {"a": -1, "b": -1}, {})
    check_sidecar(sidecar, ["a", "b"])
    with pytest.raises(ValueError, match="do not match the shards"):
        check_sidecar(sidecar, ["a", "b", "c"])
    assert check_sidecar(sidecar, ["a", "b"], negatives_per_query=2) == 2  # short rows are counted
    with pytest.raises(ValueError, match="in no shard"):
        check_sidecar(Sidecar({"a": ["z"]}, {"a": [0.1]}, {"a": -1}, {}), ["a"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from sde_ray.data.convert import convert_mmeb
    from sde_ray.data.synthetic import write_synthetic_mmeb

    root = tmp_path_factory.mktemp("corpus")
    summary = write_synthetic_mmeb(root / "synth", seed=0, train_per_subset=2, eval_per_dataset=2)
    manifest = convert_mmeb(summary["train_dir"], root / "shards", samples_per_shard=8, workers=1, progress=False)
    return [str(root / "shards" / entry["name"]) for entry in manifest["shards"]]


def _write_sidecar(directory, keys, negatives):
    from sde_ray.data.negatives import write_part

    write_part(directory / "parts" / "all.parquet", keys, negatives, [[0.5] * len(n) for n in negatives],
               np.ones(len(keys)), -np.ones(len(keys)))
    (directory / "sidecar.json").write_text(json.dumps({"complete": True, "embed_dim": 8}))


def test_mined_negatives_join_reads_the_negatives_targets_from_the_shards(shards, tmp_path):
    from sde_ray.data.negatives import MinedNegatives, read_shard

    columns = [read_shard(s) for s in shards]
    keys = [k for c in columns for k in c["key"]]
    texts = [t for c in columns for t in c["pos_text"]]
    images = [i for c in columns for i in c["pos_image"]]
    hashes = [h for c in columns for h in c["target_hash"]]
    chosen = [[keys[(i + 3) % len(keys)], keys[(i + 7) % len(keys)]] for i in range(len(keys))]
    _write_sidecar(tmp_path, keys, chosen)
    join = MinedNegatives(lambda raw: raw, str(tmp_path), shards, negatives_per_query=1)
    rows = list(range(0, len(keys), 5))
    out = join({"key": [keys[i] for i in rows]})
    for n, i in enumerate(rows):
        j = (i + 3) % len(keys)
        assert out["neg_text"][n] == [texts[j]] and out["neg_image"][n] == [images[j]]
        assert out["neg_target_hash"][n] == [hashes[j]]


def test_driver_refuses_a_sidecar_of_other_shards_before_training(shards, tmp_path):
    from sde_ray.config import ConfigError, load_config
    from sde_ray.data.negatives import shard_keys
    from sde_ray.train.driver import check_negatives

    keys = shard_keys(shards)
    _write_sidecar(tmp_path, keys[:-1], [[keys[0]]] * (len(keys) - 1))  # one sample short
    config = load_config(None, [f"data.negatives_sidecar={tmp_path}", "loss.negatives_per_query=1"])
    with pytest.raises(ValueError, match="do not match the shards"):
        check_negatives(config, shards)
    with pytest.raises(ConfigError, match="negatives_per_query=0"):
        check_negatives(load_config(None, [f"data.negatives_sidecar={tmp_path}"]), shards)

