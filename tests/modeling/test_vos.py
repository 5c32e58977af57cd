"""
rcdet.modeling.vos: the uncertainty loss against a recomputation of the original VOS code's
formula, the sampler against VOS's brute-force selection, the outliers' likelihood, two gloo
workers against one process, config errors; in the head: the step's syncs, StandardROIHeads'
losses and initialisation kept, a short training of configs/shapes_vos_ood.yaml, --resume, and
the OOD benchmark's energy score for a VOS model.
"""

import math
import os

import pytest
import torch
from conftest import (
    REPO,
    run_training,
    shapes_batch,
    tiny_cfg,
    tiny_ood_benchmark,
    train_step_syncs,
)
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from dist_utils import run_workers
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from rcdet.config import ConfigError
from rcdet.modeling.vos import (
    VirtualOutlierSynthesis,
    class_gaussians,
    draw_outlier_noise,
    virtual_outliers,
    weighted_energy,
)
from rcdet.testing import SyncCounter

K, D = 3, 6


def _filled_vos(size=12, seed=0, **kw):
    """A VOS module (float64) whose class queues are already full."""
    torch.manual_seed(seed)
    vos = VirtualOutlierSynthesis(K, D, sample_number=size, starting_iter=1, **kw).double()
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(K).repeat_interleave(size)
    feats = torch.randn(K * size, D, generator=g, dtype=torch.float64) + labels[:, None]
    vos.queue.enqueue(feats, labels, gather=False)
    assert vos.queue.filled.all()
    return vos


def _step_inputs(n=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(n, D, generator=g, dtype=torch.float64)
    logits = torch.randn(n, K + 1, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 3, 2, 0, 3, 2, 1][:n])  # 3 = background
    return feats, logits, labels


# ---------------------------------------------------------------- the loss and the sampler


def _original_loss(vos, queue, feats, logits, labels, noise, classifier):
    """
    VOS's detection/modeling/roihead_gmm.py (_forward_box, full queues, iteration >=
    STARTING_ITER), written again with its own loops: FIFO per-class queues, the class means and
    the covariance of the concatenated centred queues plus 1e-4 I, the energy with relu'd
    weights, logistic regression on [foreground energies, outlier energies] with labels 1 / 0,
    CrossEntropyLoss (mean), times 0.1. The random draw is replaced by the given noise (the
    sampler is checked separately): each outlier is mean + scale_tril @ noise.
    """
    data = {c: queue[c].clone() for c in range(K)}
    fg = [i for i in range(len(labels)) if labels[i] != K]
    for i in fg:
        c = int(labels[i])
        data[c] = torch.cat((data[c][1:], feats[i].view(1, -1)), 0)
    x = torch.cat([data[c] - data[c].mean(0) for c in range(K)], 0)
    means = [data[c].mean(0) for c in range(K)]
    cov = x.t() @ x / len(x) + 0.0001 * torch.eye(D, dtype=x.dtype)
    outliers = []
    for c in range(K):
        dist = torch.distributions.MultivariateNormal(means[c], covariance_matrix=cov)
        outliers.append(means[c] + noise[c] @ dist.scale_tril.t())
    outliers = torch.cat(outliers)

    def log_sum_exp(value):
        m, _ = torch.max(value, dim=1, keepdim=True)
        return m.squeeze(1) + torch.log(
            torch.sum(F.relu(vos.energy_weight.view(1, -1)) * torch.exp(value - m), dim=1)
        )

    e_fg = log_sum_exp(logits[fg][:, :-1])
    e_bg = log_sum_exp(classifier(outliers)[:, :-1])
    inp = torch.cat((e_fg, e_bg), -1)
    target = torch.cat((torch.ones(len(fg)), torch.zeros(len(outliers)))).long()
    out = vos.logistic_regression(inp.view(-1, 1))
    return 0.1 * torch.nn.CrossEntropyLoss()(out, target)


@pytest.mark.parametrize("select", [1, 3])
def test_uncertainty_loss_matches_the_original_formula(select):
    vos = _filled_vos(select=select)
    queue = vos.queue.embeddings.clone()
    feats, logits, labels = _step_inputs()
    torch.manual_seed(0)
    classifier = torch.nn.Linear(D, K + 1).double()
    logits.requires_grad_(True)
    torch.manual_seed(11)
    out = vos(feats, logits, labels, classifier, iteration=5, max_foreground=8)
    torch.manual_seed(11)
    noise = draw_outlier_noise(K, select, vos.sample_from, D, "cpu").double().view(K, select, D)
    ref = _original_loss(vos, queue, feats, logits, labels, noise, classifier)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    assert out.scalars["vos_active"].item() == 1.0
    params = [logits, vos.energy_weight, *vos.logistic_regression.parameters()]
    params += list(classifier.parameters())
    got = torch.autograd.grad(out.loss, params)
    expected = torch.autograd.grad(ref, params)
    for a, b in zip(got, expected):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_loss_waits_for_starting_iter_and_for_full_queues():
    feats, logits, labels = _step_inputs()
    classifier = torch.nn.Linear(D, K + 1).double()
    vos = _filled_vos()
    before = vos(feats, logits, labels, classifier, iteration=0, max_foreground=8)
    assert before.loss.item() == 0.0 and "vos_active" not in before.scalars
    assert vos.queue.filled.all()  # still enqueued before STARTING_ITER
    # A class queue one short of full: VOS trains nothing this step (it checks before enqueueing).
    empty = VirtualOutlierSynthesis(K, D, sample_number=12, starting_iter=0).double()
    out = empty(feats, logits.requires_grad_(True), labels, classifier, iteration=3)
    assert out.loss.item() == 0.0 and out.scalars["vos_active"].item() == 0.0
    out.loss.backward()
    assert torch.isfinite(logits.grad).all() and empty.energy_weight.grad is not None
    # The connected zero reaches every VOS parameter (DDP needs a gradient for each).
    assert all(p.grad is not None for p in empty.parameters())


def test_noise_selects_like_vos_brute_force_selection():
    # VOS: draw sample_from samples of N(mu, Sigma), keep the select least likely. The same as the
    # select largest standard-normal norms with uniform directions, which draw_outlier_noise draws
    # directly. Compared over many classes (independent repetitions) at once.
    reps, select, sample_from, dim = 4000, 2, 60, 5
    torch.manual_seed(0)
    fast = draw_outlier_noise(reps, select, sample_from, dim, "cpu").view(reps, select, dim)
    torch.manual_seed(1)
    brute = torch.randn(reps, sample_from, dim)
    log_prob = torch.distributions.Normal(0.0, 1.0).log_prob(brute).sum(dim=2)
    keep = (-log_prob).topk(select, dim=1).indices
    brute = brute.gather(1, keep[..., None].expand(-1, -1, dim))
    for k in range(select):
        a, b = fast[:, k].pow(2).sum(1), brute[:, k].pow(2).sum(1)
        # Standard errors of the means are about 0.05 here.
        assert abs(a.mean() - b.mean()) < 0.25, (k, a.mean(), b.mean())
        assert abs(a.std() - b.std()) < 0.25, (k, a.std(), b.std())
        assert F.normalize(fast[:, k], dim=1).mean(0).abs().max() < 0.06
    assert (fast[:, 0].norm(dim=1) >= fast[:, 1].norm(dim=1)).all()


def test_outliers_are_less_likely_than_the_queue_features():
    torch.manual_seed(0)
    k, s, d = 4, 300, 8
    centres = 3 * torch.randn(k, 1, d)
    features = centres + torch.randn(k, s, d) @ torch.randn(d, d) * 0.5
    filled = torch.ones(k, s, dtype=torch.bool)
    mean, cov = class_gaussians(features, filled, 1e-4)
    torch.testing.assert_close(mean, features.mean(1))
    noise = draw_outlier_noise(k, 3, 10000, d, "cpu")
    outliers, ok = virtual_outliers(mean, cov, noise)
    assert ok.item() and outliers.shape == (k * 3, d)
    for c in range(k):
        gauss = torch.distributions.MultivariateNormal(mean[c].double(), cov.double())
        lp_out = gauss.log_prob(outliers[3 * c : 3 * c + 3].double())
        lp_queue = gauss.log_prob(features[c].double())
        assert lp_out.max() < lp_queue.min(), (c, lp_out, lp_queue.min())


def test_energy_and_failed_factorisation_stay_finite():
    logits = torch.tensor([[1.0, 2.0, 3.0], [-50.0, 0.0, 50.0]])
    w = torch.tensor([0.5, 1.0, 0.0])
    expected = torch.log((w * logits.exp()).sum(1))
    torch.testing.assert_close(weighted_energy(logits, w), expected)
    assert torch.isfinite(weighted_energy(logits, torch.zeros(3))).all()
    bad = -torch.eye(3)  # not positive definite: outliers fall back to the means, flagged
    out, ok = virtual_outliers(torch.ones(2, 3), bad, torch.randn(2, 3))
    assert not ok.item() and torch.equal(out, torch.ones(2, 3))


def test_vos_step_makes_no_sync():
    vos = _filled_vos()
    feats, logits, labels = _step_inputs()
    classifier = torch.nn.Linear(D, K + 1).double()
    logits.requires_grad_(True)
    with SyncCounter() as counter:
        vos(feats, logits, labels, classifier, iteration=5, max_foreground=8).loss.backward()
    assert counter.syncs == 0, dict(counter.sync_ops)


# ---------------------------------------------------------------- 2 workers against 1

SCENARIOS = {"uneven": 7, "no_foreground_on_worker_1": 10}
FEAT_IN, PAD = 4, 6


class _Net(torch.nn.Module):
    """Box head, box predictor and VOS, with the predictor's own loss as a detector would have."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(FEAT_IN, D).double()
        self.predictor = torch.nn.Linear(D, K + 1).double()
        self.vos = _filled_vos(size=8)

    def forward(self, x, labels, iteration, world, total):
        feats = F.relu(self.head(x))
        logits = self.predictor(feats)
        out = self.vos(feats, logits, labels, self.predictor, iteration, max_foreground=PAD)
        ce = F.cross_entropy(logits, labels, reduction="sum") * world / total
        return out.loss + ce


def _ddp_batch(step):
    g = torch.Generator().manual_seed(50 + step)
    x = torch.randn(13, FEAT_IN, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 3, 2, 3, 0, 1, 3, 3, 3, 2, 3, 3])
    return x, labels


def _run(net, part, world, rank_seed, scenario):
    """Two steps (iteration 0: enqueue only; 1: VOS on); returns losses, gradients, queue."""
    results = []
    for step in range(2):
        x, labels = _ddp_batch(step)
        if scenario == "no_foreground_on_worker_1":
            labels = labels.clone()
            labels[SCENARIOS[scenario] :] = K
        net.zero_grad()
        torch.manual_seed(100 + step + rank_seed)
        with SyncCounter() as counter:
            loss = net(x[part], labels[part], step, world, len(labels))
            loss.backward()
        module = net.module if isinstance(net, DistributedDataParallel) else net
        results.append(
            {
                "loss": loss.item(),
                "grads": [p.grad.clone() for p in module.parameters()],
                "queue": {k: v.clone() for k, v in module.vos.queue.state_dict().items()},
                "syncs": dict(counter.sync_ops),
            }
        )
    return results


def _vos_worker(rank, world_size):
    results = {}
    for scenario, split in SCENARIOS.items():
        # broadcast_buffers off, as detectron2 wraps models: the queues must agree by themselves.
        net = DistributedDataParallel(_Net(), broadcast_buffers=False)
        part = slice(0, split) if rank == 0 else slice(split, None)
        # Different random streams per worker: every worker must use rank 0's draw.
        results[scenario] = _run(net, part, world_size, 7 * rank, scenario)
    return results


@pytest.fixture(scope="module")
def vos_workers(tmp_path_factory):
    return run_workers(_vos_worker, 2, tmp_path_factory.mktemp("vos_ddp"))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_workers_equal_one_process(vos_workers, scenario):
    reference = _run(_Net(), slice(None), 1, 0, scenario)
    for step, ref in enumerate(reference):
        r0, r1 = vos_workers[0][scenario][step], vos_workers[1][scenario][step]
        assert (r0["loss"] + r1["loss"]) / 2 == pytest.approx(ref["loss"], rel=1e-9, abs=1e-12)
        for g0, g1, g in zip(r0["grads"], r1["grads"], ref["grads"]):
            # DDP averaged the gradients: both workers hold the one-process gradient.
            torch.testing.assert_close(g0, g, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(g1, g, rtol=1e-9, atol=1e-12)
        for key, value in ref["queue"].items():
            assert torch.equal(r0["queue"][key], r1["queue"][key]), key
            torch.testing.assert_close(r0["queue"][key], value, rtol=1e-12, atol=1e-12)
        assert r0["syncs"] == {} and r1["syncs"] == {}
    vos_grad = reference[1]["grads"][4]  # energy_weight: VOS was on at step 1
    assert vos_grad.abs().max() > 1e-6


# ---------------------------------------------------------------- configs and the head

VOS_ON = ("MODEL.RCDET.VOS.ENABLED", "True", "MODEL.RCDET.VOS.SAMPLE_NUMBER", "40")


@pytest.mark.parametrize(
    "opts, match",
    [
        (("MODEL.RCDET.VOS.SELECT", "20", "MODEL.RCDET.VOS.SAMPLE_FROM", "10"), "VOS.SELECT = 20"),
        (("MODEL.RCDET.VOS.SELECT", "0"), "VOS.SELECT = 0"),
        (("MODEL.RCDET.VOS.SAMPLE_NUMBER", "20"), r"VOS.SAMPLE_NUMBER = 20.*at least 30"),
        (("MODEL.RCDET.VOS.SAMPLE_FROM", "0"), "VOS.SAMPLE_FROM = 0"),
        (("MODEL.RCDET.VOS.STARTING_ITER", "-1"), "VOS.STARTING_ITER = -1"),
        (("MODEL.RCDET.VOS.LOSS_WEIGHT", "-0.1"), "VOS.LOSS_WEIGHT = -0.1"),
        (("MODEL.RCDET.VOS.COVARIANCE_EPS", "0.0"), "VOS.COVARIANCE_EPS = 0.0"),
    ],
)
def test_impossible_vos_keys_are_config_errors(tiny_shapes, opts, match):
    cfg = tiny_cfg(
        "configs/shapes_rince.yaml", *VOS_ON, "MODEL.RCDET.VOS.STARTING_ITER", "0", *opts
    )
    with pytest.raises(ConfigError, match=match):
        build_model(cfg)


@pytest.mark.parametrize(
    "config, classes, start",
    [
        ("configs/shapes_vos_ood.yaml", 7, 600),
        ("configs/shapes_rince_vos_ood.yaml", 7, 600),
        ("configs/voc_vos.yaml", 20, 4000),
        ("configs/voc_vos_ood.yaml", 18, 4000),
    ],
)
def test_vos_configs_keep_vos_settings(config, classes, start):
    from detectron2.config import get_cfg

    from rcdet.config import add_rcdet_config
    from rcdet.modeling.vos import build_vos

    cfg = get_cfg()
    add_rcdet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == classes
    dim = cfg.MODEL.ROI_BOX_HEAD.FC_DIM
    vos = build_vos(cfg, classes, dim)
    assert (vos.starting_iter, vos.sample_from, vos.select, vos.loss_weight) == (
        start,
        10000,
        1,
        0.1,
    )
    assert vos.starting_iter < cfg.SOLVER.MAX_ITER and vos.covariance_eps == 1e-4
    assert vos.queue.size == (1000 if "voc" in config else 200)
    assert (cfg.MODEL.RCDET.LOSS != "none") == ("rince" in config)


def test_starting_iter_beyond_max_iter_warns(tiny_shapes):
    cfg = tiny_cfg("configs/shapes_vos_ood.yaml")  # STARTING_ITER 600, MAX_ITER 2
    with pytest.warns(UserWarning, match=r"STARTING_ITER = 600 .*MAX_ITER = 2.*never starts"):
        build_model(cfg)


def _model(*opts, seed=0):
    cfg = tiny_cfg("configs/shapes_rince.yaml", *opts)
    torch.manual_seed(seed)
    return build_model(cfg)


def test_vos_keeps_standard_initialisation_and_losses(tiny_shapes):
    std = _model("MODEL.ROI_HEADS.NAME", "StandardROIHeads")
    off = _model("MODEL.RCDET.LOSS", "none")
    assert off.roi_heads.vos is None
    vos = _model("MODEL.RCDET.LOSS", "none", *VOS_ON, "MODEL.RCDET.VOS.STARTING_ITER", "0")
    sd_std, sd_vos = std.state_dict(), vos.state_dict()
    assert all(torch.equal(sd_std[k], sd_vos[k]) for k in sd_std)
    assert {k for k in sd_vos if k not in sd_std} == {
        k for k in sd_vos if k.startswith("roi_heads.vos.")
    }
    batch = shapes_batch()
    (_, l_std), (_, l_vos) = train_step_syncs(std, batch), train_step_syncs(vos, batch)
    for k in l_std:
        assert torch.equal(l_std[k], l_vos[k]), k
    assert set(l_vos) - set(l_std) == {"loss_vos"}


def _fill_head_queue(head):
    queue = head.vos.queue
    g = torch.Generator().manual_seed(9)
    labels = torch.arange(head.num_classes).repeat_interleave(queue.size)
    queue.enqueue(torch.rand(len(labels), queue.dim, generator=g), labels, gather=False)
    assert queue.filled.all()


@pytest.mark.parametrize("loss", ["none", "rince_out_in"])
def test_head_step_with_vos_adds_at_most_one_sync(tiny_shapes, loss):
    with_vos = _model("MODEL.RCDET.LOSS", loss, *VOS_ON, "MODEL.RCDET.VOS.STARTING_ITER", "0")
    if with_vos.roi_heads.contrast is not None:
        with_vos.roi_heads.contrast.static_shapes = True  # the accelerator path
    _fill_head_queue(with_vos.roi_heads)
    without = _model("MODEL.RCDET.LOSS", "none")
    on, losses = train_step_syncs(with_vos, shapes_batch())
    off, _ = train_step_syncs(without, shapes_batch())
    assert losses["loss_vos"] > 0 and torch.isfinite(losses["loss_vos"])
    diff = on.sync_ops - off.sync_ops
    assert sum(diff.values()) <= 1, dict(diff)
    assert (off.sync_ops - on.sync_ops) == {}
    grads = [p.grad for p in with_vos.roi_heads.vos.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_head_logs_vos_scalars(tiny_shapes):
    model = _model("MODEL.RCDET.LOSS", "none", *VOS_ON, "MODEL.RCDET.VOS.STARTING_ITER", "0")
    _fill_head_queue(model.roi_heads)
    model.train()
    with EventStorage(0) as storage:
        model(shapes_batch())
    logged = storage.latest()
    assert logged["rcdet/vos_queue_fill"][0] == 1.0 and logged["rcdet/vos_active"][0] == 1.0
    assert {"rcdet/vos_energy_id", "rcdet/vos_energy_outlier"} <= set(logged)


# ---------------------------------------------------------------- training, resume, benchmark

TRAIN_OPTS = ("MODEL.RCDET.VOS.STARTING_ITER", "0", "MODEL.RCDET.VOS.SAMPLE_NUMBER", "38")


@pytest.fixture(scope="module")
def vos_run(tiny_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("vos_run")
    cfg = tiny_cfg(
        "configs/shapes_vos_ood.yaml", "DATASETS.TEST", "()", *TRAIN_OPTS, output_dir=out
    )
    trainer = run_training(cfg.clone())
    return cfg, trainer, out


def test_short_training_of_the_vos_config_runs(vos_run):
    cfg, trainer, out = vos_run
    assert trainer.iter == 2 and os.path.isfile(out / "model_final.pth")
    history = trainer.storage.history("loss_vos").values()
    assert len(history) == 2 and all(math.isfinite(v) for v, _ in history)
    assert trainer.model.roi_heads.vos.queue.filled.any()


def test_resume_restores_the_vos_queue(vos_run):
    from rcdet.engine import Trainer

    cfg, first, out = vos_run
    queue = {k: v.clone() for k, v in first.model.roi_heads.vos.queue.state_dict().items()}
    cfg = cfg.clone()
    cfg.SOLVER.MAX_ITER = 4
    cfg.freeze()
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    for key, value in resumed.model.roi_heads.vos.queue.state_dict().items():
        assert torch.equal(value, queue[key]), key
    assert queue["filled"].any()


def test_ood_benchmark_scores_a_vos_model_by_energy(vos_run, tmp_path):
    from rcdet.evaluation.ood_benchmark import run_ood_benchmark
    from rcdet.evaluation.report import protocol_of

    _, _, out = vos_run
    cfg = tiny_cfg(
        "configs/shapes_vos_ood.yaml",
        *TRAIN_OPTS,
        "MODEL.WEIGHTS",
        str(out / "model_final.pth"),
        *tiny_ood_benchmark("none", bootstrap=20),
    )
    cfg.freeze()
    report = run_ood_benchmark(cfg, str(tmp_path))
    scores = report.scores
    # No projection: the embedding scores are not available, the logit scores (energy, VOS's
    # score) are, with the same matching and intervals as every other head.
    assert not any(scores[s]["available"] for s in ("cosine", "knn", "gaussian"))
    assert scores["energy"]["available"] and scores["msp"]["available"]
    assert report.counts["detections"] > 0
    assert set(scores["energy"]) == set(scores["msp"]) and "auroc_ci" in scores["energy"]
    protocol = protocol_of(report)
    assert protocol["matching"] == "one_per_object" and protocol["match_iou"] == 0.1
