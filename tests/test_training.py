"""Training: loss and probabilities, hooks, run record, run ids, resume rules, determinism, evaluate, CLI."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from torch import nn
from typer.testing import CliRunner

from carebench.cli import app
from carebench.data.definitions import load_phenotypes
from carebench.data.loading import build_fold, make_loader
from carebench.data.store import open_dataset
from carebench.errors import UserError
from carebench.models.base import BaseModel, ModelOutput
from carebench.runs import predictions_frame
from carebench.training import config as C
from carebench.training import evaluate_run, resolve_config, train_run
from carebench.training.module import CareBenchModule, task_loss
from carebench.training.predict import probabilities
from fake_dataset import make_fake_dataset

torch.set_num_threads(2)
NO_PROGRESS = {"progress": False}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fake_dataset(tmp_path_factory.mktemp("training"), n=150, image_size=16, n_features=4, seed=2)


def _cfg(data_dir, model="lstm", task="mortality", **opts):
    overrides = opts.pop("overrides", None)
    return resolve_config(
        data=data_dir,
        model=model,
        task=task,
        preset="test",
        options={**NO_PROGRESS, **opts},
        overrides=overrides,
    )


@pytest.fixture(scope="module")
def mortality_run(data_dir, tmp_path_factory):
    return train_run(_cfg(data_dir), tmp_path_factory.mktemp("runs"))


# ------------------------------------------------------------------------------------------- loss, probabilities
def test_task_loss_and_probabilities():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.1]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    manual = -(y * torch.log(torch.sigmoid(logits)) + (1 - y) * torch.log(1 - torch.sigmoid(logits))).mean()
    assert task_loss("multilabel", logits, y).item() == pytest.approx(manual.item(), rel=1e-6)
    logits7 = torch.randn(5, 7)
    cls = torch.tensor([0, 6, 3, 3, 1])
    manual_ce = -torch.log_softmax(logits7, -1)[torch.arange(5), cls].mean()
    assert task_loss("multiclass", logits7, cls).item() == pytest.approx(manual_ce.item(), rel=1e-6)
    p = probabilities("multiclass", logits7)
    torch.testing.assert_close(p.sum(-1), torch.ones(5))
    torch.testing.assert_close(probabilities("binary", logits), torch.sigmoid(logits))


class _Tiny(BaseModel):
    """Unregistered tiny model: an aux loss, an extra head, a hook and its own parameter groups."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr",)
    default_hparams: ClassVar[dict[str, Any]] = {"aux_weight": 0.5}

    def __init__(self, task, n_features, image_size, **hp):
        super().__init__(task, n_features, image_size, **hp)
        self.lin = nn.Linear(2 * n_features, self.num_outputs)
        self.side = nn.Linear(n_features, self.num_outputs)
        self.hook_calls: list[float] = []

    def forward(self, batch):
        x = torch.cat([batch["ehr"], batch["ehr_mask"]], -1).mean(1)
        side = self.side(batch["ehr"].mean(1))
        return ModelOutput(
            self.lin(x),
            aux_losses={"side": self.hparams["aux_weight"] * side.pow(2).mean()},
            extra_logits={"ehr": side},
        )

    def training_hook(self, trainer_module, batch, output, loss):
        self.hook_calls.append(float(loss.detach()))

    def configure_param_groups(self):
        return [{"params": self.lin.parameters()}, {"params": self.side.parameters(), "lr": 0.123}]


def test_module_loss_hook_param_groups_and_extra_heads(data_dir):
    pl.seed_everything(0, verbose=False)
    data = open_dataset(data_dir)
    fold = build_fold(data, task="mortality", fold=1, image_size=16, load_cxr=False)
    model = _Tiny("mortality", 4, 16)
    module = CareBenchModule(model, "mortality", lr=1e-2)
    batch = fold.train.__getitems__(list(range(10)))
    out = model(batch)
    expect = F.binary_cross_entropy_with_logits(out.logits, batch["y"]) + out.aux_losses["side"]
    loss = module.training_step(batch, 0)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    assert model.hook_calls == [pytest.approx(loss.item())]
    opt = module.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 0.123]
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, make_loader(fold.train, 16, shuffle=True), make_loader(fold.val, 16, shuffle=False))
    n_steps = int(np.ceil(len(fold.train) / 16))
    assert len(model.hook_calls) == 1 + n_steps
    trainer.test(module, make_loader(fold.test, 16, shuffle=False), verbose=False)
    pred = module.test_predictions
    assert list(pred.columns) == ["stay_id", "cxr_input", "y_mortality", "p_mortality", "p_mortality__ehr"]
    with torch.no_grad():
        full = fold.test.__getitems__(list(range(len(fold.test))))
        side = torch.sigmoid(model(full).extra_logits["ehr"][:, 0]).numpy()
    order = np.argsort(full["stay_id"].numpy())
    np.testing.assert_allclose(pred["p_mortality__ehr"].to_numpy(), side[order], rtol=1e-5)
    assert module.test_metrics["head:ehr"]["auroc"] == pytest.approx(
        skm.roc_auc_score(pred["y_mortality"], pred["p_mortality__ehr"])
    )


class _Hooked(_Tiny):
    """Records the order of the framework's hook calls; adds a layer at the start of epoch 1."""

    train_task_loss: ClassVar[bool] = True

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.events: list[str] = []
        self.extra = nn.ModuleList()
        self.grad_seen: list[bool] = []

    def forward(self, batch):
        out = super().forward(batch)
        for layer in self.extra:
            out.logits = out.logits + layer(batch["ehr"].mean(1))
        return out

    def on_train_epoch_start(self, module):
        self.events.append(f"start{module.current_epoch}")
        if module.current_epoch == 1:
            layer = nn.Linear(self.n_features, self.num_outputs)
            self.extra.append(layer)
            module.add_trainable_parameters(list(layer.parameters()))
            self.new_layer_init = layer.weight.detach().clone()

    def on_train_epoch_end(self, module):
        self.events.append(f"end{module.current_epoch}")

    def before_optimizer_step(self, module, optimizer):
        self.grad_seen.append(self.lin.weight.grad is not None and bool(self.lin.weight.grad.abs().sum() > 0))

    def configure_param_groups(self):
        return None


def test_model_hooks_order_new_parameters_and_aux_only_objective(data_dir):
    pl.seed_everything(0, verbose=False)
    fold = build_fold(open_dataset(data_dir), task="mortality", fold=1, image_size=16, load_cxr=False)
    model = _Hooked("mortality", 4, 16)
    module = CareBenchModule(model, "mortality", lr=1e-2)
    module.on_validation_epoch_end = (lambda orig: lambda: (model.events.append("val"), orig())[1])(
        module.on_validation_epoch_end
    )
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    train = make_loader(fold.train, 16, shuffle=True, drop_last=True)
    trainer.fit(module, train, make_loader(fold.val, 32, shuffle=False))
    assert model.events == ["start0", "val", "end0", "start1", "val", "end1"]
    assert len(model.grad_seen) == 2 * len(train) and all(model.grad_seen)
    opt = trainer.optimizers[0]
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"][0] is model.extra[0].weight
    assert not torch.equal(model.extra[0].weight, model.new_layer_init)  # the added layer was trained
    # train_task_loss = False: the returned loss is the sum of the aux losses only
    aux_only = _Tiny("mortality", 4, 16)
    aux_only.train_task_loss = False
    batch = fold.train.__getitems__(list(range(8)))
    loss = CareBenchModule(aux_only, "mortality").training_step(batch, 0)
    assert loss.item() == pytest.approx(aux_only(batch).aux_losses["side"].item(), rel=1e-6)


def test_predictions_frame_los_and_phenotype_columns():
    rng = np.random.default_rng(0)
    arr = {
        "stay_id": np.array([5, 3]),
        "has_cxr": np.array([1, 0]),
        "y": np.array([6, 0]),
        "p": rng.dirichlet(np.ones(7), 2),
        "p__cxr": rng.dirichlet(np.ones(7), 2),
    }
    df = predictions_frame("los", [f"los_{k}" for k in range(7)], arr)
    assert list(df.columns) == (
        ["stay_id", "cxr_input", "y_los"]
        + [f"p_los_{k}" for k in range(7)]
        + [f"p_los_{k}__cxr" for k in range(7)]
    )
    assert (
        df.stay_id.tolist() == [3, 5]
        and df.y_los.tolist() == [0, 6]
        and df.cxr_input.tolist() == [False, True]
    )
    names = [p.column for p in load_phenotypes()]
    arr = {
        "stay_id": np.array([1]),
        "has_cxr": np.array([1]),
        "y": np.ones((1, 25)),
        "p": np.full((1, 25), 0.5),
    }
    df = predictions_frame("phenotype", names, arr)
    assert [c for c in df.columns if c.startswith("y_")] == [f"y_{n}" for n in names]
    assert [c for c in df.columns if c.startswith("p_")] == [f"p_{n}" for n in names]


# ------------------------------------------------------------------------------------------------ config, run id
def test_config_presets_overrides_and_run_id(data_dir, tmp_path):
    cfg = _cfg(data_dir, overrides={"lr": 0.01, "model.hidden": 4, "dropout": 0.1})
    assert cfg.lr == 0.01 and cfg.model_args["hidden"] == 4 and cfg.model_args["dropout"] == 0.1
    assert cfg.image_size == C.PRESETS["test"]["image_size"] and cfg.cxr_dropout_seed == cfg.seed
    assert cfg.run_id == _cfg(data_dir, overrides={"lr": 0.01, "model.hidden": 4, "dropout": 0.1}).run_id
    assert cfg.run_id != _cfg(data_dir, overrides={"lr": 0.02, "model.hidden": 4, "dropout": 0.1}).run_id
    assert _cfg(data_dir).run_id != _cfg(data_dir, overrides={"model.hidden": 4}).run_id
    assert _cfg(data_dir).run_id != _cfg(data_dir, cxr_dropout_train=0.5).run_id
    assert _cfg(data_dir).run_id == _cfg(data_dir, num_workers=2, threads=1).run_id  # execution-only settings
    copy = shutil.copytree(data_dir, tmp_path / "moved")  # same dataset elsewhere: same id
    assert _cfg(copy).run_id == _cfg(data_dir).run_id
    full = resolve_config(data=data_dir, model="lstm", task="los", preset="full")
    assert (full.image_size, full.batch_size, full.max_epochs, full.model_args["hidden"]) == (
        224,
        16,
        50,
        256,
    )
    with pytest.raises(C.ConfigError, match="unknown option 'hiden'"):
        _cfg(data_dir, overrides={"hiden": 3})
    with pytest.raises(C.ConfigError, match="'max_epochs' must be an integer"):
        _cfg(data_dir, overrides={"max_epochs": "ten"})
    with pytest.raises(C.ConfigError, match="--precision"):
        _cfg(data_dir, precision="fp8")
    assert C.parse_overrides(["lr=1e-4", "model.backbone=resnet18", "augment=false"]) == {
        "lr": 1e-4,
        "model.backbone": "resnet18",
        "augment": False,
    }
    with pytest.raises(C.ConfigError, match="key=value"):
        C.parse_overrides(["lr"])


# ----------------------------------------------------------------------------------------------- the run record
def test_run_record_and_predictions_join_cohort(mortality_run, data_dir):
    run = mortality_run
    names = sorted(os.listdir(run.run_dir))
    assert {"config.yaml", "metrics.json", "predictions.parquet", "checkpoint", "DONE", "log"} <= set(names)
    assert not any(n.startswith(".") for n in os.listdir(run.run_dir.parent))  # no partial dir left behind
    cfg = C.TrainConfig.from_yaml(run.run_dir / "config.yaml")
    assert cfg.run_id == run.run_id == run.run_dir.name and cfg.model == "lstm" and cfg.task == "mortality"
    cohort = pd.read_parquet(data_dir / "cohort.parquet")
    pred = pd.read_parquet(run.run_dir / "predictions.parquet")
    test_ids = cohort.loc[cohort.fold == 1, "stay_id"]
    assert pred.stay_id.is_unique and sorted(pred.stay_id) == sorted(test_ids)
    joined = pred.merge(cohort, on="stay_id", how="left", validate="one_to_one")
    assert (joined.y_mortality == joined.label_mortality).all()
    assert (joined.cxr_input == joined.has_cxr).all()
    assert pred.p_mortality.between(0, 1).all()
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["test"]["auprc"] == pytest.approx(
        skm.average_precision_score(pred.y_mortality, pred.p_mortality), abs=1e-9
    )
    assert metrics["test"]["auroc"] == pytest.approx(
        skm.roc_auc_score(pred.y_mortality, pred.p_mortality), abs=1e-9
    )
    assert metrics["selection_metric"] == "auprc" and metrics["splits"]["test"]["n_stays"] == len(pred)
    assert 0 <= metrics["best_epoch"] < C.PRESETS["test"]["max_epochs"]
    assert (
        metrics["epochs_trained"] == C.PRESETS["test"]["max_epochs"]
    )  # patience 2 cannot stop 2 epochs early
    curves = pd.read_csv(run.run_dir / "log" / "metrics.csv")
    assert curves["val/auprc"].notna().sum() == metrics["epochs_trained"]
    assert metrics["val_best"] == pytest.approx(curves["val/auprc"].max())
    assert list(metrics["normalisation"]) == ["feat_0", "feat_1", "feat_2", "feat_3"]


def test_rerun_skips_and_unfinished_is_redone(mortality_run, data_dir):
    run = mortality_run
    stamp = (run.run_dir / "DONE").stat().st_mtime_ns
    again = train_run(_cfg(data_dir), run.run_dir.parent)
    assert again.skipped and again.run_id == run.run_id
    assert (run.run_dir / "DONE").stat().st_mtime_ns == stamp
    # a run directory without DONE (a killed run) is replaced by a complete one
    cfg = _cfg(data_dir, seed=7)
    stale = run.run_dir.parent / cfg.run_id
    stale.mkdir()
    (stale / "junk.txt").write_text("half-written")
    redone = train_run(cfg, run.run_dir.parent)
    assert not redone.skipped and (stale / "DONE").is_file() and not (stale / "junk.txt").exists()


def test_precision_and_workers_default_per_preset_and_device(data_dir, monkeypatch):
    """`precision` given nowhere: the preset's (quick/test 32-true; full auto = bf16-mixed on a device with native
    bfloat16, else 32-true); an explicit precision always wins; loader workers 0 on CPU, up to 4 on a GPU."""
    full = {"data": data_dir, "model": "lstm", "task": "mortality", "preset": "full"}
    assert _cfg(data_dir).precision == "32-true" and resolve_config(
        **{**full, "preset": "quick"}
    ).precision == ("32-true")
    for native, expect in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda n=native: n)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
        assert C.native_bf16("cpu") is native
        assert resolve_config(**full).precision == expect
        assert resolve_config(**full, options={"precision": "auto"}).precision == expect
        assert resolve_config(**full, options={"precision": "32"}).precision == "32-true"  # fp32: one flag
        assert resolve_config(**full, overrides={"precision": "bf16"}).precision == "bf16-mixed"
    assert resolve_config(**full).num_workers == 0 and _cfg(data_dir, num_workers=3).num_workers == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # configured where no GPU is visible
    gpu = resolve_config(**full, options={"accelerator": "gpu"})
    assert gpu.precision == "bf16-mixed" and gpu.num_workers == max(
        0, min(4, len(os.sched_getaffinity(0)) - 1)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_config(**full, options={"accelerator": "cuda"}).precision == "32-true"  # emulated only


def test_same_seed_identical_predictions_and_evaluate_reproduces(mortality_run, data_dir, tmp_path):
    second = train_run(_cfg(data_dir), tmp_path)
    a = pd.read_parquet(mortality_run.run_dir / "predictions.parquet")
    b = pd.read_parquet(second.run_dir / "predictions.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    recomputed = evaluate_run(second.run_dir)
    stored = json.loads((second.run_dir / "metrics.json").read_text())["test"]
    for key in ("auroc", "auprc", "brier", "ece", "accuracy"):
        assert recomputed[key] == pytest.approx(stored[key], abs=1e-12), key


class _TinyFusion(BaseModel):
    """Unregistered small fusion model: mean EHR + a 3x3 conv over the X-ray, zeroed where missing."""

    modalities: ClassVar[tuple[str, ...]] = ("ehr", "cxr")
    default_hparams: ClassVar[dict[str, Any]] = {"channels": 4}
    presets: ClassVar[dict[str, dict[str, Any]]] = {"quick": {}, "full": {}, "test": {}}

    def __init__(self, task, n_features, image_size, **hp):
        super().__init__(task, n_features, image_size, **hp)
        self.conv = nn.Conv2d(1, self.hparams["channels"], 3, padding=1)
        self.head = nn.Linear(2 * n_features + self.hparams["channels"], self.num_outputs)

    def forward(self, batch):
        img = self.conv(batch["cxr"]).mean((2, 3)) * batch["has_cxr"][:, None].float()
        ehr = torch.cat([batch["ehr"], batch["ehr_mask"]], -1).mean(1)
        return ModelOutput(self.head(torch.cat([ehr, img], -1)))


@pytest.fixture()
def tiny_fusion(monkeypatch):
    from carebench.models import registry

    monkeypatch.setitem(registry._REGISTRY, "tiny_fusion", _TinyFusion)
    monkeypatch.setattr(_TinyFusion, "name", "tiny_fusion")
    return "tiny_fusion"


def test_los_matched_with_images_and_test_dropout(data_dir, tmp_path, tiny_fusion):
    cfg = _cfg(data_dir, model=tiny_fusion, task="los", cohort="matched", cxr_dropout_test=1.0, fold=2)
    run = train_run(cfg, tmp_path)
    pred = pd.read_parquet(run.run_dir / "predictions.parquet")
    cohort = pd.read_parquet(data_dir / "cohort.parquet")
    expect = cohort.loc[(cohort.fold == 2) & cohort.has_cxr, "stay_id"]
    assert sorted(pred.stay_id) == sorted(expect)
    assert not pred.cxr_input.any()  # every test X-ray removed
    assert run.metrics["splits"]["test"]["n_cxr_dropped"] == len(expect)
    probs = pred[[f"p_los_{k}" for k in range(7)]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    joined = pred.merge(cohort, on="stay_id", validate="one_to_one")
    assert (joined.y_los == joined.label_los).all()
    m = run.metrics["test"]
    assert m["auroc_ovr_macro"] == pytest.approx(
        np.mean(
            [skm.roc_auc_score(pred.y_los == k, probs[:, k]) for k in range(7) if (pred.y_los == k).any()]
        )
    )
    assert run.metrics["selection_metric"] == "auroc_ovr_macro"


def test_same_seed_identical_with_images_and_augmentation(data_dir, tmp_path, tiny_fusion):
    runs = [
        train_run(_cfg(data_dir, model=tiny_fusion, cxr_dropout_train=0.3, seed=4), tmp_path / str(i))
        for i in range(2)
    ]
    a, b = (pd.read_parquet(r.run_dir / "predictions.parquet") for r in runs)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    other = train_run(_cfg(data_dir, model=tiny_fusion, cxr_dropout_train=0.3, seed=5), tmp_path / "2")
    assert not np.array_equal(
        pd.read_parquet(other.run_dir / "predictions.parquet").p_mortality, a.p_mortality
    )


def test_training_augments_only_during_fit(data_dir, tiny_fusion):
    """The training split a run trains on augments its present X-rays (missing ones stay zero); validation and
    test batches are the stored images; an EHR-only model or augment=false trains on the stored images."""
    from carebench.training.run import training_split

    data = open_dataset(data_dir)
    fold = build_fold(data, task="mortality", fold=1, image_size=16)
    cfg = _cfg(data_dir, model=tiny_fusion)
    assert cfg.augment
    positions = list(range(len(fold.train)))
    raw = fold.train.__getitems__(positions)["cxr"]
    trained = training_split(cfg, fold).__getitems__(positions)["cxr"]
    has = torch.from_numpy(fold.train.has_cxr.copy())
    assert has.sum() >= 2 and (trained[~has] == 0).all()
    assert all(
        not torch.allclose(trained[i], raw[i]) for i in torch.nonzero(has).flatten()
    )  # one draw per image
    assert training_split(_cfg(data_dir, model=tiny_fusion, overrides={"augment": False}), fold) is fold.train
    assert training_split(_cfg(data_dir), fold) is fold.train  # lstm reads no X-ray
    for split in (fold.val, fold.test):  # never augmented
        assert split.augment_seed is None


def test_augmented_batches_do_not_depend_on_the_workers(data_dir):
    """Augmentation runs in the loader (worker processes when num_workers > 0), seeded per batch: the batches of
    an augmented training split are identical with 0 and 2 workers, differ with another seed, and a batch's
    augmentation does not depend on which batches came before it."""
    fold = build_fold(open_dataset(data_dir), task="phenotype", fold=1, image_size=16)
    aug = fold.train.augmented(7)
    serial = list(make_loader(aug, 8, shuffle=True, drop_last=True, seed=3))
    parallel = list(make_loader(aug, 8, shuffle=True, drop_last=True, seed=3, num_workers=2))
    assert len(serial) == len(parallel) >= 2
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = list(make_loader(fold.train.augmented(8), 8, shuffle=True, drop_last=True, seed=3))
    assert any(not torch.equal(a["cxr"], b["cxr"]) for a, b in zip(serial, other, strict=True))
    positions = [5, 1, 4, 2]
    assert torch.equal(aug.__getitems__(positions)["cxr"], aug.__getitems__(positions)["cxr"])


def test_a_staged_model_is_selected_and_stopped_on_its_last_stage_only(data_dir, tmp_path):
    """MedFuse with one pretraining epoch: epoch 0's checkpoint (the EHR classifier) can never be the result."""
    cfg = _cfg(data_dir, model="medfuse", max_epochs=3, overrides={"model.pretrain_epochs": 1})
    run = train_run(cfg, tmp_path)
    assert run.metrics["best_epoch"] >= 1 and run.metrics["epochs_trained"] == 3
    curves = pd.read_csv(run.run_dir / "log" / "metrics.csv").dropna(subset=["train/loss"])
    assert curves.groupby("epoch")["train/aux_pretrain_cxr"].mean().notna().tolist() == [True, False, False]
    with pytest.raises(UserError, match=r"last training stage starts at epoch 3 .* max_epochs is 3"):
        train_run(
            _cfg(data_dir, model="medfuse", max_epochs=3, overrides={"model.pretrain_epochs": 3}), tmp_path
        )


@pytest.mark.parametrize(("epoch", "skipped"), [(0, True), (1, True), (2, False), (3, False)])
def test_checkpoint_and_early_stopping_ignore_the_epochs_before_the_last_stage(epoch, skipped):
    """The run-level test above can pass by luck (a later epoch scoring higher); this pins the rule itself: with
    selection_start_epoch 2, epochs 0 and 1 neither save the checkpoint nor count toward early stopping."""
    from lightning.pytorch.trainer.states import TrainerFn

    from carebench.training.run import StagedCheckpoint, StagedEarlyStopping

    staged = SimpleNamespace(model=SimpleNamespace(selection_start_epoch=2))
    trainer = SimpleNamespace(
        current_epoch=epoch,
        lightning_module=staged,
        fast_dev_run=False,
        sanity_checking=False,
        global_step=100 + epoch,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
    )
    ckpt = StagedCheckpoint(monitor="val/auprc", mode="max")
    stop = StagedEarlyStopping(monitor="val/auprc", mode="max", patience=1)
    assert ckpt._should_skip_saving_checkpoint(trainer) is skipped
    assert stop._should_skip_check(trainer) is skipped


@pytest.mark.parametrize(("scale", "lrs"), [(1.0, [1e-2, 0.123]), (0.5, [5e-3, 0.0615])])
def test_a_new_stage_restores_the_initial_lr_and_resets_the_plateau_scheduler(scale, lrs):
    model = type("_Staged", (_Tiny,), {"last_stage_lr_scale": scale})("mortality", 4, 16)
    module = CareBenchModule(model, "mortality", lr=1e-2)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for group in opt.param_groups:
        group["lr"] *= 0.25  # reduced on a plateau during the first stage
    sched.best, sched.num_bad_epochs = 0.3, 2
    module._trainer = SimpleNamespace(
        optimizers=[opt], lr_scheduler_configs=[SimpleNamespace(scheduler=sched)]
    )
    module.restart_schedule()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(lrs)
    assert sched.best == float("inf") and sched.num_bad_epochs == 0


@pytest.mark.slow
@pytest.mark.parametrize("model", __import__("carebench.models", fromlist=["list_models"]).list_models())
def test_every_registered_model_trains_and_its_checkpoint_reproduces_the_test(model, data_dir, tmp_path):
    run = train_run(_cfg(data_dir, model=model), tmp_path)  # 2 epochs: methods that change between epochs do
    pred = pd.read_parquet(run.run_dir / "predictions.parquet")
    assert pred.p_mortality.between(0, 1).all() and len(pred) == run.metrics["splits"]["test"]["n_stays"]
    again = evaluate_run(run.run_dir)
    for key in ("auroc", "auprc", "brier"):
        assert again[key] == pytest.approx(run.metrics["test"][key], abs=1e-9), key


def test_evaluate_rejects_other_dataset(mortality_run, tmp_path):
    other = make_fake_dataset(tmp_path, n=60, n_features=4, seed=9)
    with pytest.raises(Exception, match="not the dataset"):
        evaluate_run(mortality_run.run_dir, other)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_gives_one_row_per_test_stay(data_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "carebench"
    cmd = [
        str(exe),
        "train",
        "--data",
        str(data_dir),
        "--model",
        "lstm",
        "--task",
        "mortality",
        "--preset",
        "test",
        "--devices",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    pred = pd.read_parquet(run_dir / "predictions.parquet")
    cohort = pd.read_parquet(data_dir / "cohort.parquet")
    assert pred.stay_id.is_unique and sorted(pred.stay_id) == sorted(cohort.stay_id[cohort.fold == 1])
    assert C.TrainConfig.from_yaml(run_dir / "config.yaml").devices == 2


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_train_evaluate_and_errors(data_dir, tmp_path):
    runner = CliRunner()
    args = [
        "train",
        "--data",
        str(data_dir),
        "--model",
        "lstm",
        "--task",
        "phenotype",
        "--preset",
        "test",
        "--fold",
        "3",
        "--seed",
        "1",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path),
        "max_epochs=1",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("lstm_phenotype_f3_s1_"))
    cfg = C.TrainConfig.from_yaml(run_dir / "config.yaml")
    assert cfg.max_epochs == 1 and cfg.fold == 3 and cfg.threads == 1
    pred = pd.read_parquet(run_dir / "predictions.parquet")
    assert sum(c.startswith("p_pheno_") for c in pred.columns) == 25
    res2 = runner.invoke(app, args)
    assert res2.exit_code == 0 and "skipped" in res2.output
    ev = runner.invoke(app, ["evaluate", str(run_dir), "--out", str(tmp_path / "ev.json")])
    assert ev.exit_code == 0, ev.output
    stored = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert json.loads((tmp_path / "ev.json").read_text())["auprc_macro"] == pytest.approx(
        stored["auprc_macro"]
    )
    bad = runner.invoke(app, [*args[:-1], "epochs=3"])
    assert bad.exit_code == 2 and "unknown option 'epochs'" in bad.output
    bad = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tmp_path / "nope"),
            "--model",
            "lstm",
            "--task",
            "los",
            "--out",
            str(tmp_path),
        ],
    )
    assert bad.exit_code == 2 and "--data" in bad.output and "nope: does not exist" in bad.output
