"""The training methods. Each one builds its models, optimizers and state from a ``Context``,
runs one optimizer step per ``train_step`` (forward, loss through the public API with
``backend=--impl`` and ``group=``, backward, step), and evaluates on the held-out split.

Randomness comes only from the run's seeded generators (``ctx.generators``): "augment" (views),
"mixing" (the Mixing config of MoCHi / synthetic hard negatives), "method" (captions, composites,
semantic-partner picks, QK bank views); model initialization uses the global torch generator
seeded with --seed. All of them are checkpointed, so a resumed run draws the same numbers.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import contrastive_kernels as ck

from . import evaluate
from .augment import PRESETS, scaled
from .data import Captions, Dataset
from .models import Encoder, LabelWiseModel, TextEncoder


@dataclasses.dataclass
class Context:
    cfg: object                       # the resolved argparse namespace
    data: Dataset
    device: torch.device
    generators: Dict[str, torch.Generator]
    group: Optional[object] = None    # torch.distributed process group (--distributed)
    rank: int = 0
    world: int = 1


class Lockstep:
    """The lockstep check of ``--shadow-impl``: at every loss call of the run, the same loss is
    evaluated again on detached copies of the very same inputs with the run's backend and with
    each shadow backend; the relative differences of the values and of the gradients with respect
    to every differentiable input (features, temperature / logit scale) are recorded. The mixing
    generator is rewound for each evaluation so that all of them draw the same synthetic
    negatives, and left where the run's own call left it: the run itself is unchanged (its losses
    equal a run without the check, bit for bit).

    Free-running runs with two backends separate after some steps however small their per-step
    difference (training is chaotic: a 1-ulp change grows to the step-to-step noise of the
    loss); this check measures the backends' own difference along the whole trajectory."""

    def __init__(self, shadows: List[str], mixing_generator: torch.Generator):
        self.shadows, self.generator = list(shadows), mixing_generator
        self.loss_diff = {name: [] for name in self.shadows}
        self.grad_diff = {name: [] for name in self.shadows}
        # the training step (from 1) of each call, set by the trainer: a step makes 0 to 2 calls
        self.step: Optional[int] = None
        self.call_step: List[Optional[int]] = []

    def _evaluate(self, fn, args, kw, backend, state):
        self.generator.set_state(state)
        inputs = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                  for a in args]
        out = fn(*inputs, **{**kw, "backend": backend})
        wrt = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]
        grads = torch.autograd.grad(out, wrt) if wrt else ()
        return out.detach(), grads

    def call(self, fn, args, kw):
        before = self.generator.get_state()
        loss = fn(*args, **kw)
        after = self.generator.get_state()
        base, base_grads = self._evaluate(fn, args, kw, kw["backend"], before)
        for name in self.shadows:
            out, grads = self._evaluate(fn, args, kw, name, before)
            self.loss_diff[name].append(float((out - base).abs() / base.abs().clamp(min=1e-12)))
            worst = 0.0
            for g0, g1 in zip(base_grads, grads):
                worst = max(worst, float((g1 - g0).abs().max() / g0.abs().max().clamp(min=1e-12)))
            self.grad_diff[name].append(worst)
        self.call_step.append(self.step)
        self.generator.set_state(after)
        return loss

    def state_dict(self):
        return {"loss_diff": self.loss_diff, "grad_diff": self.grad_diff, "call_step": self.call_step}

    def load_state_dict(self, state):
        self.loss_diff, self.grad_diff = state["loss_diff"], state["grad_diff"]
        # checkpoints written before call_step was recorded: those calls' steps are unknown
        calls = len(next(iter(self.loss_diff.values()), []))
        self.call_step = state.get("call_step", [None] * calls)

    def summary(self):
        out = {}
        for name in self.shadows:
            ld, gd = self.loss_diff[name], self.grad_diff[name]
            out[name] = {"calls": len(ld), "max_rel_loss_diff": max(ld, default=0.0),
                         "mean_rel_loss_diff": sum(ld) / max(1, len(ld)),
                         "max_rel_grad_diff": max(gd, default=0.0),
                         "mean_rel_grad_diff": sum(gd) / max(1, len(gd))}
        return out


def _optimizer(params, cfg):
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Method:
    """Base: the state every method shares and the hooks the trainer calls."""

    name = "base"
    augmentation = "digits"

    def __init__(self, ctx: Context):
        self.ctx, self.cfg, self.data, self.device = ctx, ctx.cfg, ctx.data, ctx.device
        self.gen = ctx.generators
        self.aug = scaled(PRESETS[self.augmentation], self.cfg.aug_strength)
        self.modules: Dict[str, nn.Module] = {}
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        shadows = getattr(self.cfg, "shadow_impl", None)
        self.lockstep = Lockstep(shadows, self.gen["mixing"]) if shadows else None

    # -- helpers -------------------------------------------------------------------------------
    def loss_kwargs(self, **extra):
        return dict(temperature=self.cfg.temperature, similarity=self.cfg.similarity,
                    backend=self.cfg.impl, group=self.ctx.group, **extra)

    def contrast(self, fn, *args, **kwargs):
        """``fn(*args, **loss_kwargs(**kwargs))``: every loss of a training step goes through
        here, so that ``--shadow-impl`` can check it in lockstep (see ``Lockstep``)."""
        kw = self.loss_kwargs(**kwargs)
        if self.lockstep is None:
            return fn(*args, **kw)
        return self.lockstep.call(fn, args, kw)

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """DDP under --distributed (gradients averaged over ranks), else the module itself."""
        if self.ctx.group is None:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids,
                                       find_unused_parameters=find_unused_parameters)

    def single_encoder(self) -> None:
        """One encoder for both views, with its optimizer (and DDP wrapper under --distributed)."""
        self.encoder = _encoder(self.ctx)
        self.model = self.wrap(self.encoder)
        self.modules = {"encoder": self.encoder}
        self.optimizers = {"encoder": _optimizer(self.encoder.parameters(), self.cfg)}

    def view(self, x: torch.Tensor, aug=None) -> torch.Tensor:
        """An augmented view (drawn on the CPU from the "augment" generator), on the device."""
        return (aug or self.aug)(x, self.gen["augment"]).to(self.device)

    @staticmethod
    def step_optimizer(opt, loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # -- hooks ---------------------------------------------------------------------------------
    def train_step(self, idx: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def extra_state(self) -> Dict:
        """Method state beyond modules and optimizers (queue, bank, counters); what a method
        derives deterministically from the data at start-up (mined pairs) is not saved."""
        return {}

    def load_extra_state(self, state: Dict) -> None:
        pass

    def feature_fn(self) -> Callable:
        return self.modules["encoder"].features

    def train_mode(self, on: bool) -> None:
        for m in self.modules.values():
            m.train(on)

    def evaluate(self) -> Dict[str, float]:
        return evaluate.classification_metrics(self.feature_fn(), self.data, self.device,
                                               self.cfg.knn_k)

    def summary(self) -> Dict:
        """Method-specific facts for metrics.json."""
        return {}


def _encoder(ctx: Context) -> Encoder:
    cfg = ctx.cfg
    return Encoder(ctx.data.image_shape, cfg.width, cfg.feat_dim, cfg.embed_dim).to(ctx.device)


# ---------------------------------------------------------------------------------------------


class MoCo(Method):
    """MoCo v2 style: a query encoder trained by InfoNCE against the momentum (EMA) key
    encoder's keys and a ``MoCoQueue`` of past keys (enqueued after backward). ``--mixing``
    turns on MoCHi through ``info_nce(mixing=ck.Mixing(...))``."""

    name = "moco"

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = self.cfg
        self.encoder = _encoder(ctx)
        self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.queue = ck.nn.MoCoQueue(cfg.queue_size, cfg.embed_dim, device=self.device,
                                     group=ctx.group)
        self.model = self.wrap(self.encoder)
        self.modules = {"encoder": self.encoder, "key_encoder": self.key_encoder}
        self.optimizers = {"encoder": _optimizer(self.encoder.parameters(), cfg)}
        self.mixing = (ck.Mixing(*cfg.mixing, generator=self.gen["mixing"])
                       if cfg.mixing is not None else None)

    @torch.no_grad()
    def momentum_update(self):
        m = self.cfg.momentum
        for pk, pq in zip(self.key_encoder.parameters(), self.encoder.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)

    def train_step(self, idx, step):
        x = self.data.train_x[idx]
        x1, x2 = self.view(x), self.view(x)
        q = F.normalize(self.model(x1), dim=1)
        with torch.no_grad():
            self.momentum_update()
            k = F.normalize(self.key_encoder(x2), dim=1)
        loss = self.contrast(ck.info_nce, q, k, self.queue.keys, tau_plus=self.cfg.tau_plus,
                             beta=self.cfg.beta, mixing=self.mixing)
        self.step_optimizer(self.optimizers["encoder"], loss)
        self.queue.enqueue(k)  # after backward: the loss may have saved the queue
        return loss.detach()

    def extra_state(self):
        return {"queue": self.queue.state_dict()}

    def load_extra_state(self, state):
        self.queue.load_state_dict(state["queue"])


class SimCLR(Method):
    """SimCLR: NT-Xent over two views (``nt_xent``); ``--tau-plus``/``--beta`` for the
    debiased / hard-negative estimators, ``--mixing`` for synthetic hard negatives."""

    name = "simclr"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.single_encoder()
        self.mixing = (ck.Mixing(*self.cfg.mixing, generator=self.gen["mixing"])
                       if self.cfg.mixing is not None else None)

    def train_step(self, idx, step):
        x = self.data.train_x[idx]
        z1, z2 = self.model(torch.cat([self.view(x), self.view(x)])).chunk(2)
        loss = self.contrast(ck.nt_xent, z1, z2, tau_plus=self.cfg.tau_plus, beta=self.cfg.beta,
                             mixing=self.mixing)
        self.step_optimizer(self.optimizers["encoder"], loss)
        return loss.detach()


class SupCon(Method):
    """Supervised contrastive learning (``sup_con``) over two views with the class labels."""

    name = "supcon"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.single_encoder()

    def train_step(self, idx, step):
        x = self.data.train_x[idx]
        y = self.data.train_y[idx].to(self.device)
        z = self.model(torch.cat([self.view(x), self.view(x)]))
        loss = self.contrast(ck.sup_con, z, torch.cat([y, y]))
        self.step_optimizer(self.optimizers["encoder"], loss)
        return loss.detach()


class _ClipModel(nn.Module):
    """Image encoder, text encoder and ``ck.nn.ClipLoss`` (whose learnable log logit scale is
    used) in one module, so that DDP averages the logit scale's gradient too. Returns the
    normalized features and the scale; the loss is ``clip_loss`` on them."""

    def __init__(self, image, text, loss):
        super().__init__()
        self.image, self.text, self.loss = image, text, loss

    def forward(self, images, tokens):
        img = F.normalize(self.image(images), dim=1)
        txt = F.normalize(self.text(tokens), dim=1)
        return img, txt, self.loss.logit_scale


class Clip(Method):
    """CLIP on image/caption pairs: a conv image encoder, a bag-of-words text encoder over
    captions such as "a handwritten seven", the symmetric ``clip_loss`` with a learnable logit
    scale (initialized at 1 / --temperature). ``--compose RHO``: CLIP-C, a fraction RHO of each
    batch is replaced by composites (half of each of two images, captions joined by " and ")."""

    name = "clip"
    augmentation = "light"

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = self.cfg
        self.captions = Captions(self.data.class_names, digits=self.data.name == "digits")
        self.encoder = _encoder(ctx)
        self.text = TextEncoder(len(self.captions.vocab), cfg.embed_dim, cfg.embed_dim).to(self.device)
        self.loss = ck.nn.ClipLoss(init_logit_scale=1.0 / cfg.temperature, similarity=cfg.similarity,
                                   backend=cfg.impl, group=ctx.group).to(self.device)
        self.clip = _ClipModel(self.encoder, self.text, self.loss)
        self.model = self.wrap(self.clip)
        self.modules = {"clip": self.clip}
        self.optimizers = {"clip": _optimizer(self.clip.parameters(), cfg)}
        self.composites = 0

    def loss_kwargs(self, **extra):
        # the temperature lives in the learnable logit scale (ck.nn.ClipLoss.logit_scale)
        return dict(similarity=self.cfg.similarity, backend=self.cfg.impl, group=self.ctx.group,
                    **extra)

    def feature_fn(self):
        return self.encoder.features

    def train_step(self, idx, step):
        from .data import compose_halves

        x = self.data.train_x[idx]
        texts = self.captions.sample(self.data.train_y[idx], self.gen["method"])
        if self.cfg.compose > 0:
            x, texts, chosen = compose_halves(x, texts, self.cfg.compose, self.gen["method"])
            self.composites += int(chosen.sum())
        tokens = self.captions.tokenize(texts).to(self.device)
        img, txt, scale = self.model(self.view(x), tokens)
        loss = self.contrast(ck.clip_loss, img, txt, scale)
        self.step_optimizer(self.optimizers["clip"], loss)
        return loss.detach()

    def extra_state(self):
        return {"composites": self.composites}

    def load_extra_state(self, state):
        self.composites = state["composites"]

    def summary(self):
        return {"logit_scale": float(self.loss.logit_scale.detach()), "composites_seen": self.composites,
                "vocabulary": len(self.captions.vocab)}

    def evaluate(self):
        out = super().evaluate()
        out["zero_shot_top1"] = self.zero_shot()
        return out

    @torch.no_grad()
    def zero_shot(self) -> float:
        """Held-out accuracy of classifying images by their nearest class caption (averaged over
        the caption templates), as CLIP's zero-shot evaluation."""
        c = self.data.num_classes
        texts = [self.captions.caption(label, t) for label in range(c)
                 for t in range(len(self.captions.templates))]
        txt = F.normalize(self.text(self.captions.tokenize(texts).to(self.device)), dim=1)
        prototypes = F.normalize(txt.view(c, -1, txt.shape[1]).mean(1), dim=1).cpu()
        img = evaluate.embed(self.encoder, self.data.test_x, self.device)
        return float(((img @ prototypes.T).argmax(1) == self.data.test_y).float().mean())


class SemanticPositivePairs(Method):
    """Semantic positive pairs (Alkhalefi et al. 2023) on top of two-view instance
    discrimination. Before training, a FROZEN encoder embeds every training image and
    ``mine_semantic_positives`` (cosine top --spp-k, score >= --spp-threshold) yields pairs (i, j)
    of different images. Each step, every anchor i gets one partner: a mined j picked at random,
    or i itself when it has none; an augmented view of the partner is an extra positive. Loss
    (symmetric): multi_positive_info_nce(z1, [z2; zp], positives {i, B+i}) and the same with z1
    and z2 swapped.

    Frozen encoders (--spp-encoder): "pca", the top 32 principal components of the raw training
    pixels (centred), no training and no download; "random", a randomly initialized
    ``ConvBackbone`` (fixed seed) with its features centred."""

    name = "spp"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.single_encoder()
        self.mine()

    @torch.no_grad()
    def frozen_embeddings(self) -> torch.Tensor:
        x = self.data.train_x.flatten(1)
        if self.cfg.spp_encoder == "pca":
            centred = x - x.mean(0)
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            return centred @ vh[: min(32, vh.shape[0])].T
        from .models import ConvBackbone

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(12345)
            net = ConvBackbone(self.data.image_shape, self.cfg.width, self.cfg.feat_dim)
        feats = net(self.data.train_x)
        return feats - feats.mean(0)

    def mine(self):
        emb = self.frozen_embeddings()
        n = emb.shape[0]
        pairs, scores = ck.mine_semantic_positives(emb, min(self.cfg.spp_k, n - 1),
                                                   self.cfg.spp_threshold, backend="auto")
        self.pairs = pairs
        self.counts = torch.bincount(pairs[:, 0], minlength=n)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        y = self.data.train_y
        self.precision = float((y[pairs[:, 0]] == y[pairs[:, 1]]).float().mean()) if len(pairs) else 0.0

    def partners(self, idx: torch.Tensor) -> torch.Tensor:
        count = self.counts[idx]
        u = torch.rand(idx.shape[0], generator=self.gen["method"])
        pick = (u * count).long().clamp(max=(count - 1).clamp(min=0))
        mined = self.pairs[(self.offsets[idx] + pick).clamp(max=max(0, len(self.pairs) - 1)), 1] \
            if len(self.pairs) else idx
        return torch.where(count > 0, mined, idx)

    def train_step(self, idx, step):
        b = idx.shape[0]
        x = self.data.train_x[idx]
        xp = self.data.train_x[self.partners(idx)]
        z1, z2, zp = self.model(torch.cat([self.view(x), self.view(x), self.view(xp)])).chunk(3)
        rows = torch.arange(b, device=self.device)
        # under group= the keys of all ranks are the columns, in rank order (2b per rank)
        positives = torch.stack([rows, rows + b], 1) + self.ctx.rank * 2 * b
        mpi = ck.multi_positive_info_nce
        loss = 0.5 * (self.contrast(mpi, z1, torch.cat([z2, zp]), positives)
                      + self.contrast(mpi, z2, torch.cat([z1, zp]), positives))
        self.step_optimizer(self.optimizers["encoder"], loss)
        return loss.detach()

    def summary(self):
        n = len(self.counts)
        return {"spp_pairs": len(self.pairs), "spp_coverage": float((self.counts > 0).float().mean()),
                "spp_pair_precision": self.precision, "spp_encoder": self.cfg.spp_encoder,
                "spp_train_images": n}


class QKIteration(Method):
    """QK Iteration (Wu & Wu 2021): separate query and key models optimized in turn. For
    --qk-switch steps (or epochs) the query model trains while the key model is frozen, then the
    other way round. Because the frozen side does not change during its block, the features it
    gives a bank of --bank-size images are exact for the whole block: they are computed once at
    the start of each block (the refresh the method prescribes) and serve as cached negatives,
    with the other rows of the batch. Loss: info_nce(trained side, frozen side's positive,
    queue=bank, in_batch_negatives=True); ``--similarity l2`` gives -||q - k||^2.

    Data: on ``--data synthetic`` a copy-detection set (queries are transformed copies, keys the
    base images, the bank holds distractor images: query-side bank views are transformed
    copies); on digits both sides see augmented views of the same image and the bank holds
    training images (drawn at random at each refresh)."""

    name = "qk"

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = self.cfg
        self.copy_set = self.data.kind == "copy"
        self.copy_aug = scaled(PRESETS["copy"], cfg.aug_strength)
        self.q_enc, self.k_enc = _encoder(ctx), _encoder(ctx)
        self.q_model, self.k_model = self.wrap(self.q_enc), self.wrap(self.k_enc)
        self.modules = {"query": self.q_enc, "key": self.k_enc}
        self.optimizers = {"query": _optimizer(self.q_enc.parameters(), cfg),
                           "key": _optimizer(self.k_enc.parameters(), cfg)}
        every, unit = cfg.qk_switch
        steps_per_epoch = math.ceil(len(self.data.train_x) / cfg.batch_size)
        self.switch = every * steps_per_epoch if unit == "epochs" else every
        self.bank: Optional[torch.Tensor] = None
        self.bank_block = -1
        self.refreshes = 0

    def block(self, step):
        return step // self.switch

    def trains_query(self, step) -> bool:
        return self.block(step) % 2 == 0

    def query_view(self, x):
        return self.view(x, self.copy_aug if self.copy_set else self.aug)

    def key_view(self, x):
        return x.to(self.device) if self.copy_set else self.view(x)

    @torch.no_grad()
    def refresh_bank(self, step):
        """Frozen side's features of the bank images, once per block."""
        frozen_is_key = self.trains_query(step)
        g = self.gen["method"]
        if self.copy_set:
            images = self.data.extra["distractors"]
            if not frozen_is_key:
                images = self.copy_aug(images, g)
        else:
            pick = torch.randint(0, len(self.data.train_x), (self.cfg.bank_size,), generator=g)
            images = self.aug(self.data.train_x[pick], g)
        net = self.k_enc if frozen_is_key else self.q_enc
        feats = [F.normalize(net(images[i:i + 1024].to(self.device)), dim=1)
                 for i in range(0, len(images), 1024)]
        self.bank = torch.cat(feats)
        self.bank_block = self.block(step)
        self.refreshes += 1

    def train_step(self, idx, step):
        if self.bank_block != self.block(step):
            self.refresh_bank(step)
        x = self.data.train_x[idx]
        xq, xk = self.query_view(x), self.key_view(x)
        if self.trains_query(step):
            q = F.normalize(self.q_model(xq), dim=1)
            with torch.no_grad():
                k = F.normalize(self.k_enc(xk), dim=1)
            loss = self.contrast(ck.info_nce, q, k, self.bank, in_batch_negatives=True)
            self.step_optimizer(self.optimizers["query"], loss)
        else:
            k = F.normalize(self.k_model(xk), dim=1)
            with torch.no_grad():
                q = F.normalize(self.q_enc(xq), dim=1)
            loss = self.contrast(ck.info_nce, k, q, self.bank, in_batch_negatives=True)
            self.step_optimizer(self.optimizers["key"], loss)
        return loss.detach()

    def extra_state(self):
        return {"bank": self.bank, "bank_block": self.bank_block, "refreshes": self.refreshes}

    def load_extra_state(self, state):
        self.bank, self.bank_block = state["bank"], state["bank_block"]
        self.refreshes = state["refreshes"]

    def feature_fn(self):
        return self.q_enc.features

    def evaluate(self):
        if not self.copy_set:
            return super().evaluate()
        # copy detection: each held-out transformed copy (query model) retrieves its base image
        # among the held-out bases and the distractors (key model); projections, as trained
        gallery = torch.cat([self.data.test_x, self.data.extra["distractors"]])
        q = evaluate.embed(self.q_enc, self.data.extra["test_copies"], self.device)
        k = evaluate.embed(self.k_enc, gallery, self.device)
        return {"knn_top1": evaluate.retrieval_top1(q, k, self.data.test_y),
                "retrieval_gallery": len(gallery)}

    def summary(self):
        return {"qk_switch_steps": self.switch, "bank_refreshes": self.refreshes,
                "bank_size": None if self.bank is None else len(self.bank)}


class MultiLabel(Method):
    """Label-wise alignment for semi-supervised multi-label learning (after Fan et al. 2024) on
    two-item composites. ``LabelWiseModel`` gives one feature f_{i,c} per image i and class c
    (the class embeddings E attend over the feature map); the class score is cos(f_{i,c}, E_c).
    Two ``multi_positive_info_nce`` terms over the images whose labels are known:

    - label to image: for every label c of image i, row f_{i,c} (view 1) against the keys E and
      the view-2 features f'_{j,c'} of all (image, label) rows of the batch; its positives are
      E_c and every f'_{j,c} with the same label c (its own second view included);
    - image to label: row E_c against every label-wise feature f_{j,c'} of the batch; its
      positives are the f_{j,c} of the images that have label c. This ranks, for each class, the
      images that have it above those that do not: what the class scores (and mAP) need.

    Labels: the true ones on a labelled fraction --label-ratio of the training set; after
    --pseudo-warmup steps, an unlabelled image joins with confident pseudo-labels: the classes
    whose score (on its second view, no gradient) exceeds the class's threshold, the
    --pseudo-quantile quantile of the scores of the batch's labelled images without the class
    (its other classes count as absent). Evaluation: mAP of the class scores on held-out composites, multi-label
    kNN top-1, and the pseudo-labels' precision and recall on the unlabelled training images."""

    name = "multilabel"
    augmentation = "light"

    def loss_kwargs(self, **extra):
        # no group=: both terms mix keys shared by all ranks (the class embeddings) with rows whose
        # number differs per rank, which group= does not cover; under --distributed each rank's
        # loss is its local one and DDP averages the gradients
        return dict(temperature=self.cfg.temperature, similarity=self.cfg.similarity,
                    backend=self.cfg.impl, group=None, **extra)

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = self.cfg
        self.net = LabelWiseModel(self.data.image_shape, self.data.num_classes, cfg.width,
                                  cfg.feat_dim, cfg.embed_dim).to(self.device)
        # the backbone's linear head only serves kNN evaluation: unused by the training forward
        self.model = self.wrap(self.net, find_unused_parameters=True)
        self.modules = {"model": self.net}
        self.optimizers = {"model": _optimizer(self.net.parameters(), cfg)}
        n = len(self.data.train_x)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(7))
        self.labelled = torch.zeros(n, dtype=torch.bool)
        self.labelled[order[: max(1, int(round(cfg.label_ratio * n)))]] = True
        self.pseudo_used = 0

    def feature_fn(self):
        return self.net.features

    def thresholds(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-class pseudo-label thresholds from labelled images: the --pseudo-quantile
        quantile of the scores of the labelled images that lack the class (1 = their maximum:
        a pseudo-positive outscores every labelled negative). inf where there is none."""
        out = torch.full((scores.shape[1],), math.inf, device=scores.device)
        for c in range(scores.shape[1]):
            neg = scores[labels[:, c] == 0, c]
            if neg.numel():
                out[c] = torch.quantile(neg.float(), self.cfg.pseudo_quantile)
        return out

    @staticmethod
    def positive_index(groups: torch.Tensor, offset: int, first=None) -> torch.Tensor:
        """Row r -> [first[r] (if given), offset + every row s with groups[s] == groups[r]],
        padded with -1."""
        r = groups.shape[0]
        same = groups.view(r, 1) == groups.view(1, r)                    # (R, R)
        width = int(same.sum(1).max()) if r else 0
        order = torch.argsort((~same).to(torch.int8), dim=1, stable=True)[:, :width]
        members = torch.where(torch.gather(same, 1, order), order + offset,
                              torch.full_like(order, -1))
        return members if first is None else torch.cat([first.view(r, 1), members], 1)

    def train_step(self, idx, step):
        cfg, c = self.cfg, self.data.num_classes
        x = self.data.train_x[idx]
        b = x.shape[0]
        feats = self.model(torch.cat([self.view(x), self.view(x)]))
        f1, f2 = feats[:b], feats[b:]
        targets = self.data.train_y[idx].clone().to(self.device)
        known = self.labelled[idx].to(self.device)
        if step >= cfg.pseudo_warmup:
            with torch.no_grad():
                scores = (F.normalize(f2, dim=-1) * F.normalize(self.net.class_embed, dim=-1)).sum(-1)
                pseudo = (scores > self.thresholds(scores[known], targets[known])).float()
            confident = ~known & (pseudo.sum(1) > 0)
            targets[~known] = pseudo[~known]
            known = known | confident
            self.pseudo_used += int(pseudo[confident].sum())
        targets = targets[known]
        f1, f2 = f1[known], f2[known]
        img, cls = torch.nonzero(targets > 0, as_tuple=True)
        if img.numel() == 0:  # no known or confident label in the batch: nothing to align
            loss = feats.sum() * 0.0
            self.step_optimizer(self.optimizers["model"], loss)
            return loss.detach()
        mpi = ck.multi_positive_info_nce
        # label to image: rows f_{i,c}; keys [E; f'_{rows}]
        label_to_image = self.contrast(
            mpi, f1[img, cls], torch.cat([self.net.class_embed, f2[img, cls]]),
            self.positive_index(cls, c, first=cls).to(self.device))
        # image to label: rows E; keys every f_{j,c'} (index j*C + c'); positives the images with c
        u = targets.shape[0]
        flat_pos = torch.nonzero(targets.t() > 0)                        # (P, 2): (class, image)
        counts = torch.bincount(flat_pos[:, 0], minlength=c)
        width = int(counts.max())
        positives = torch.full((c, width), -1, dtype=torch.long, device=self.device)
        slot = torch.arange(len(flat_pos), device=self.device) - (torch.cumsum(counts, 0) - counts)[flat_pos[:, 0]]
        positives[flat_pos[:, 0], slot] = flat_pos[:, 1] * c + flat_pos[:, 0]
        image_to_label = self.contrast(mpi, self.net.class_embed, f1.reshape(u * c, -1), positives)
        loss = label_to_image + image_to_label
        self.step_optimizer(self.optimizers["model"], loss)
        return loss.detach()

    def extra_state(self):
        return {"pseudo_used": self.pseudo_used}

    def load_extra_state(self, state):
        self.pseudo_used = state["pseudo_used"]

    @torch.no_grad()
    def class_scores(self, x):
        return torch.cat([self.net.scores(x[i:i + 1024].to(self.device)).float().cpu()
                          for i in range(0, len(x), 1024)])

    def evaluate(self):
        out = super().evaluate()
        out["map"] = evaluate.mean_average_precision(self.class_scores(self.data.test_x),
                                                     self.data.test_y)
        # pseudo-label quality on the unlabelled training images
        unl = ~self.labelled
        if not unl.any():
            out["pseudo_precision"] = out["pseudo_recall"] = None
            return out
        thr = self.thresholds(self.class_scores(self.data.train_x[self.labelled]),
                              self.data.train_y[self.labelled])
        pred = self.class_scores(self.data.train_x[unl]) > thr
        truth = self.data.train_y[unl] > 0
        out["pseudo_precision"] = float((pred & truth).sum() / pred.sum().clamp(min=1))
        out["pseudo_recall"] = float((pred & truth).sum() / truth.sum().clamp(min=1))
        return out

    def summary(self):
        return {"labelled_images": int(self.labelled.sum()), "pseudo_labels_used": self.pseudo_used}


METHODS = {"moco": MoCo, "simclr": SimCLR, "supcon": SupCon, "clip": Clip,
           "spp": SemanticPositivePairs, "qk": QKIteration, "multilabel": MultiLabel}
