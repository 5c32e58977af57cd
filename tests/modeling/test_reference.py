import math

import pytest
import torch
from torch.nn import functional as F

from rcdet.modeling.reference import ReferenceEmbedding, exposure_labels, with_reference_class
from rcdet.modeling.rince import ranked_info_nce

RANK = torch.tensor([[1, -1], [-1, 1]])  # two known classes, nothing similar
TAU = 0.5


def _case(reference: ReferenceEmbedding):
    # Regions: a known anchor of class 0, an exposed region, a class-0 key and a background key.
    regions = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0], [0.8, -0.4], [-1.0, 0.1]]), dim=1)
    labels = torch.tensor([0, 2, 0, 2])  # detectron2's labels: 2 = background
    exposed = torch.tensor([False, True, False, False])
    anchor_labels, key_labels = exposure_labels(labels, exposed, num_classes=2)
    f = reference()
    keys = torch.cat([regions, f])
    key_labels = torch.cat([key_labels, torch.tensor([2])])  # f: the reference class K = 2
    out = ranked_info_nce(
        regions[:2],
        anchor_labels[:2],
        keys,
        key_labels,
        with_reference_class(RANK),
        [TAU],
        "out",
        self_index=torch.tensor([0, 1]),
    )
    return out, regions, f


def test_exposed_anchors_have_f_as_their_only_positive_and_are_negatives_of_known_anchors():
    reference = ReferenceEmbedding(2, "fixed", seed=3)
    out, z, f = _case(reference)

    def s(a, b):
        return float(a @ b) / TAU

    f = f[0]
    # Known anchor 0: positive key 2; negatives: the exposed region 1, background 3 and f.
    known = -math.log(
        math.exp(s(z[0], z[2]))
        / (
            math.exp(s(z[0], z[2]))
            + math.exp(s(z[0], z[1]))
            + math.exp(s(z[0], z[3]))
            + math.exp(s(z[0], f))
        )
    )
    # Exposed anchor 1: its only positive is f; every other key (0, 2, 3) is a negative.
    exposed = -math.log(
        math.exp(s(z[1], f))
        / (math.exp(s(z[1], f)) + sum(math.exp(s(z[1], z[j])) for j in (0, 2, 3)))
    )
    assert out.anchor_counts.tolist() == [2.0]
    assert out.loss.item() == pytest.approx((known + exposed) / 2, abs=1e-6)


def test_gradient_reaches_f_only_when_learned():
    learned = ReferenceEmbedding(2, "learned", seed=3)
    out, _, _ = _case(learned)
    out.loss.backward()
    assert learned.vector.grad is not None and learned.vector.grad.abs().sum() > 0
    assert [n for n, _ in learned.named_parameters()] == ["vector"]

    fixed = ReferenceEmbedding(2, "fixed", seed=3)
    out, _, f = _case(fixed)
    assert not f.requires_grad and list(fixed.parameters()) == []
    assert "vector" in fixed.state_dict()  # saved by the checkpointer all the same
    torch.testing.assert_close(fixed(), learned().detach())  # same seed, same f


def test_reference_labels_and_matrix():
    anchor, key = exposure_labels(
        torch.tensor([0, 1, 2, -1, 0]), torch.tensor([False, False, False, False, True]), 2
    )
    assert anchor.tolist() == [0, 1, 2, -1, 2] and key.tolist() == [0, 1, 3, -1, 3]
    assert with_reference_class(RANK).tolist() == [[1, -1, -1], [-1, 1, -1], [-1, -1, 1]]
    with pytest.raises(ValueError, match="reference mode"):
        ReferenceEmbedding(4, "random")
    state = torch.random.get_rng_state()
    ReferenceEmbedding(4, "learned")
    assert torch.equal(torch.random.get_rng_state(), state)
