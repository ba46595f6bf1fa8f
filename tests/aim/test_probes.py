"""Probe heads and the probe protocol on small synthetic feature sets."""

import pytest
import torch

from aim_kedro.aim.model import AttentiveProbeHead
from aim_kedro.aim.probes import (
    FeatureSplit,
    LinearProbeHead,
    ProbeProtocol,
    ProbeTraining,
    attentive_probe_logits,
    few_shot_indices,
    fixed_lr_probe_top1,
    run_protocol,
    stratified_split,
    topk_accuracy,
    train_probe,
)

NUM_CLASSES, TOKENS, DIM, HEADS = 4, 8, 16, 2


def blobs(per_class: int, seed: int, spread: float = 0.5) -> FeatureSplit:
    """Token sets whose tokens scatter around a class centre (Gaussian blobs), float16 like the cache."""
    generator = torch.Generator().manual_seed(123)
    centres = 2.0 * torch.randn(NUM_CLASSES, DIM, generator=generator)
    noise_gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    tokens = centres[labels][:, None, :] + spread * torch.randn(
        len(labels), TOKENS, DIM, generator=noise_gen
    )
    return FeatureSplit(tokens.half(), labels)


def small_protocol(**overrides) -> ProbeProtocol:
    training = ProbeTraining(epochs=5, min_steps=40, batch_size=16)
    base = dict(
        lrs={"attentive": [1e-3, 1e-2], "linear": [1e-3, 1e-2]},
        shots=3,
        shot_seeds=(0, 1),
        training=training,
    )
    return ProbeProtocol(**{**base, **overrides})


@pytest.mark.parametrize("kind", ["attentive", "linear"])
def test_probe_learns_separable_blobs(kind):
    train, test = blobs(30, seed=0), blobs(20, seed=1)
    inputs = train.tokens if kind == "attentive" else train.pooled()
    head = train_probe(
        kind,
        inputs,
        train.labels,
        NUM_CLASSES,
        HEADS,
        1e-2,
        ProbeTraining(epochs=10, min_steps=100, batch_size=16),
    )
    assert not head.training
    logits = head((test.tokens if kind == "attentive" else test.pooled()).float())
    assert topk_accuracy(logits, test.labels)["top1"] >= 0.95


def test_probe_on_random_features_is_near_chance():
    generator = torch.Generator().manual_seed(0)
    train_labels = torch.arange(NUM_CLASSES).repeat(30)
    test_labels = torch.arange(NUM_CLASSES).repeat(50)
    train = FeatureSplit(
        torch.randn(len(train_labels), TOKENS, DIM, generator=generator), train_labels
    )
    test = FeatureSplit(
        torch.randn(len(test_labels), TOKENS, DIM, generator=generator), test_labels
    )
    top1 = fixed_lr_probe_top1(train, test, NUM_CLASSES, HEADS, small_protocol(), 1e-2)
    assert top1 < 0.5


def test_training_is_reproducible_under_a_seed():
    train = blobs(10, seed=0)
    heads = [
        train_probe(
            "attentive",
            train.tokens,
            train.labels,
            NUM_CLASSES,
            HEADS,
            1e-3,
            ProbeTraining(epochs=2, min_steps=100),
            seed=5,
        )
        for _ in range(2)
    ]
    for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_linear_head_is_affine_free_batchnorm_on_mean_pooled_tokens():
    head = LinearProbeHead(DIM, NUM_CLASSES).eval()
    assert head.bn.weight is None and head.bn.bias is None and head.bn.eps == 1e-6
    tokens = torch.randn(3, TOKENS, DIM)
    assert torch.allclose(head(tokens), head(tokens.mean(dim=1)))


def test_topk_accuracy_counts_hits_and_caps_k():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    labels = torch.tensor([0, 1, 2])
    result = topk_accuracy(logits, labels)
    assert result["top1"] == pytest.approx(1 / 3)
    assert result["top5"] == 1.0


def test_stratified_split_holds_out_a_fraction_of_every_class():
    labels = torch.arange(5).repeat_interleave(10)
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert len(keep) + len(held) == len(labels)
    assert torch.bincount(labels[held]).tolist() == [2] * 5


def test_few_shot_draws_k_per_class_from_the_pool_and_depends_on_seed():
    labels = torch.arange(3).repeat_interleave(20)
    pool = torch.arange(0, 60, 2)
    idx = few_shot_indices(labels, 4, seed=0, pool=pool)
    assert torch.bincount(labels[idx]).tolist() == [4, 4, 4]
    assert set(idx.tolist()) <= set(pool.tolist())
    assert not torch.equal(idx, few_shot_indices(labels, 4, seed=1, pool=pool))


def test_protocol_reports_every_probe_with_lr_from_the_grid():
    protocol = small_protocol()
    result = run_protocol(blobs(20, 0), blobs(10, 1), NUM_CLASSES, HEADS, protocol, layers=[2, 3])
    assert set(result) == {"attentive", "linear", "attentive_3shot", "linear_3shot"}
    for name, entry in result.items():
        assert 0.0 <= entry["top1"] <= entry["top5"] <= 1.0
        assert entry["lr"] in protocol.lrs[name.split("_")[0]]
        assert entry["layers"] == [2, 3]
        assert set(entry["sweep"]) == {"0.001", "0.01"}
    assert len(result["attentive_3shot"]["top1_per_draw"]) == 2
    assert result["attentive_3shot"]["std"] >= 0.0
    assert result["attentive"]["top1"] >= 0.9


def test_cheaper_attentive_forward_equals_the_head():
    torch.manual_seed(0)
    head = AttentiveProbeHead(DIM, HEADS, NUM_CLASSES)
    with torch.no_grad():
        head.cls_token.normal_()
    tokens = torch.randn(5, TOKENS, DIM)
    for mode in (head.train, head.eval):
        mode()
        torch.testing.assert_close(
            attentive_probe_logits(head, tokens), head(tokens), atol=1e-5, rtol=1e-5
        )
    reference = AttentiveProbeHead(DIM, HEADS, NUM_CLASSES)
    reference.load_state_dict(head.state_dict())
    head.train(), reference.train()
    attentive_probe_logits(head, tokens), reference(tokens)
    for name, buffer in reference.bn.named_buffers():
        torch.testing.assert_close(getattr(head.bn, name), buffer)


def test_low_shot_probe_on_the_drawn_rows_only_matches_the_full_set():
    train, test = blobs(10, seed=0), blobs(5, seed=1)
    protocol = small_protocol()
    full = fixed_lr_probe_top1(train, test, NUM_CLASSES, HEADS, protocol, 1e-2, shots=3)
    draws = [few_shot_indices(train.labels, 3, seed) for seed in protocol.shot_seeds]
    used = torch.unique(torch.cat(draws))
    subset = FeatureSplit(train.tokens[used], train.labels[used])
    local = [torch.searchsorted(used, d) for d in draws]
    assert (
        fixed_lr_probe_top1(subset, test, NUM_CLASSES, HEADS, protocol, 1e-2, draws=local) == full
    )


def test_gradients_are_clipped_to_the_configured_norm(monkeypatch):
    train = blobs(10, seed=0)
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        total = clip(parameters, max_norm, *args, **kwargs)
        norms.append((max_norm, float(total)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    training = ProbeTraining(epochs=1, min_steps=6, batch_size=16)
    train_probe("attentive", train.tokens, train.labels, NUM_CLASSES, HEADS, 1e-2, training)
    assert norms == []
    head = train_probe("attentive", train.tokens, train.labels, NUM_CLASSES, HEADS, 1e-2,
                       ProbeTraining(epochs=1, min_steps=6, batch_size=16, grad_clip=1e-3))
    assert len(norms) == 6 and all(max_norm == 1e-3 for max_norm, _ in norms)
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert torch.sqrt(sum(g.pow(2).sum() for g in grads)) <= 1e-3 * (1 + 1e-4)


class NoisyViews:
    """``ProbeViews`` over blob tokens: each draw adds fresh noise (an augmentation stand-in
    that counts how often it was drawn)."""

    def __init__(self, split: FeatureSplit, rows=None, draws=None):
        self.split, self.rows = split, torch.arange(len(split.labels)) if rows is None else rows
        self.draws = draws if draws is not None else []
        self.shape = (len(self.rows), *split.tokens.shape[1:])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, rows):
        return NoisyViews(self.split, self.rows[rows], self.draws)

    def views(self, generator):
        self.draws.append(len(self.rows))
        tokens = self.split.tokens[self.rows].float()
        return tokens + 0.1 * torch.randn(tokens.shape, generator=generator)


def test_protocol_on_views_fits_on_fresh_draws_and_reports_the_same_entries():
    train, test = blobs(20, 0), blobs(10, 1)
    protocol = small_protocol()
    cached = run_protocol(train, test, NUM_CLASSES, HEADS, protocol, layers=[2, 3])
    views = NoisyViews(train)
    drawn = run_protocol(train, test, NUM_CLASSES, HEADS, protocol, layers=[2, 3],
                         train_views=views)
    assert set(drawn) == set(cached)
    for name, entry in drawn.items():
        assert set(entry) == set(cached[name])
    steps = protocol.training.min_steps
    fits = 2 * (2 * len(protocol.lrs["attentive"]) + 1 + len(protocol.shot_seeds))
    assert len(views.draws) >= fits * steps  # every optimiser step drew its batch afresh
    assert drawn["attentive"]["top1"] >= 0.9
    with pytest.raises(ValueError, match="training views"):
        run_protocol(train, test, NUM_CLASSES, HEADS, protocol, [0], train_views=views[:5])
