"""The model contract, checked for every registered method and every task (a new method is tested for free).

Each test uses the method's "test" preset (smallest dims, ResNet-18, no downloads) on B=4, T=48, F=8, 32x32.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from model_batches import TASKS, B, F, S, make_batch

from carebench.errors import UserError
from carebench.models import (
    BaseModel,
    ModelConfigError,
    ModelOutput,
    create_model,
    get_model_class,
    list_models,
    num_outputs,
    register,
)
from carebench.models.base import per_sample_task_loss

MODELS = list_models()
CXR_MODELS = [m for m in MODELS if "cxr" in get_model_class(m).modalities]


def build(name: str, task: str, seed: int = 0) -> BaseModel:
    torch.manual_seed(seed)
    return create_model(name, task, F, S, preset="test")


def total_loss(model: BaseModel, out: ModelOutput, batch: dict) -> torch.Tensor:
    return per_sample_task_loss(model.task, out.logits, batch["y"]).mean() + sum(out.aux_losses.values())


def run(model: BaseModel, batch: dict, seed: int = 123) -> ModelOutput:
    torch.manual_seed(seed)  # same dropout draws for two calls in training mode
    return model(batch)


def assert_same_output(a: ModelOutput, b: ModelOutput) -> None:
    assert torch.equal(a.logits, b.logits)
    assert a.extra_logits.keys() == b.extra_logits.keys()
    for k in a.extra_logits:
        assert torch.equal(a.extra_logits[k], b.extra_logits[k]), k
    assert a.aux_losses.keys() == b.aux_losses.keys()
    for k in a.aux_losses:
        assert torch.equal(a.aux_losses[k], b.aux_losses[k]), k


def test_registry_holds_the_issue_4_methods():
    assert {"lstm", "transformer", "resnet", "latefusion", "medfuse", "drfuse"} <= set(MODELS)
    assert get_model_class("medfuse").modalities == ("ehr", "cxr")
    assert get_model_class("lstm").modalities == ("ehr",)
    assert get_model_class("resnet").modalities == ("cxr",)


@pytest.mark.parametrize("name", MODELS)
def test_class_attributes_are_complete(name):
    cls = get_model_class(name)
    assert cls.name == name
    assert {"quick", "full", "test"} <= set(cls.presets)
    assert cls.search_space, "every method declares a search space"
    for key, spec in cls.search_space.items():
        assert key in cls.default_hparams
        assert spec["type"] in {"float", "int", "categorical"}
        if spec["type"] == "categorical":
            assert spec["choices"]
        else:
            assert spec["low"] < spec["high"]
    for preset in ("quick", "full", "test"):  # every preset builds (no preset downloads weights but "full")
        if preset != "full":
            create_model(name, "mortality", F, S, preset=preset)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_shapes_and_every_parameter_learns(name, task):
    model = build(name, task).train()
    batch = make_batch(task)
    out = model(batch)
    assert out.logits.shape == (B, num_outputs(task)) and out.logits.dtype == torch.float32
    for k, v in out.extra_logits.items():
        assert v.shape == out.logits.shape, k
    for k, v in out.aux_losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    total_loss(model, out, batch).backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", MODELS)
def test_pixels_and_time_of_a_missing_xray_never_change_any_output(name, task, mode):
    model = build(name, task)
    model.train(mode == "train")
    batch = make_batch(task)
    noisy = dict(batch, cxr=batch["cxr"].clone(), cxr_hours=batch["cxr_hours"].clone())
    noisy["cxr"][~batch["has_cxr"]] = torch.randn_like(noisy["cxr"][~batch["has_cxr"]]) * 100 + 7
    noisy["cxr_hours"][~batch["has_cxr"]] = 31.5  # a missing X-ray has no time either: nothing may read it
    with torch.no_grad():
        assert_same_output(run(model, batch), run(model, noisy))
        # has_cxr given as 0/1 floats means the same
        assert_same_output(run(model, batch), run(model, dict(noisy, has_cxr=batch["has_cxr"].float())))


@pytest.mark.parametrize("name", CXR_MODELS)
def test_pixels_of_a_present_xray_do_change_the_output(name):
    """Guards the invariance test above against a model that ignores images altogether."""
    model = build(name, "phenotype").eval()
    batch = make_batch("phenotype")
    other = dict(batch, cxr=batch["cxr"].clone())
    other["cxr"][0] = torch.randn_like(other["cxr"][0])
    with torch.no_grad():
        a, b = model(batch).logits, model(other).logits
    assert not torch.allclose(a[0], b[0])
    assert torch.equal(a[1:], b[1:])  # eval mode: other stays are untouched


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", MODELS)
def test_mixed_batches_predict_each_stay_as_if_alone(name, task):
    model = build(name, task).eval()
    for pattern in [(True, True, True, True), (False, False, False, False), (True, False, True, False)]:
        batch = make_batch(task, has_cxr=pattern)
        with torch.no_grad():
            together = model(batch).logits
            alone = torch.cat([model({k: v[i : i + 1] for k, v in batch.items()}).logits for i in range(B)])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", MODELS)
def test_a_tiny_batch_can_be_overfitted(name, task):
    model = build(name, task)
    batch = make_batch(task)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.eval()
    with torch.no_grad():
        start = per_sample_task_loss(model.task, model(batch).logits, batch["y"]).mean().item()
    for step in range(1, 201):
        model.train()
        opt.zero_grad()
        total_loss(model, model(batch), batch).backward()
        opt.step()
        if step % 10 == 0:
            model.eval()
            with torch.no_grad():
                logits = model(batch).logits
            loss = per_sample_task_loss(model.task, logits, batch["y"]).mean().item()
            if loss < 0.1 * start:  # the task loss fell by more than 90 %
                return
    pytest.fail(f"{name}/{task}: task loss {start:.3f} -> {loss:.3f} after 200 steps (needed < 10 %)")


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_gives_identical_outputs(name):
    batch = make_batch("los")
    a = run(build(name, "los", seed=7).train(), batch)
    b = run(build(name, "los", seed=7).train(), batch)
    c = run(build(name, "los", seed=8).train(), batch)
    assert_same_output(a, b)
    assert not torch.equal(a.logits, c.logits)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_or_mistyped_hyperparameter_is_a_clear_error(name):
    cls = get_model_class(name)
    with pytest.raises(ModelConfigError, match="unknown hyper-parameter 'no_such_knob'") as err:
        create_model(name, "mortality", F, S, preset="test", no_such_knob=1)
    assert isinstance(err.value, UserError)
    assert all(key in str(err.value) for key in cls.default_hparams)  # lists the valid keys
    key = next(k for k, v in cls.default_hparams.items() if isinstance(v, int | float))
    with pytest.raises(ModelConfigError, match=f"'{key}' must be"):
        create_model(name, "mortality", F, S, preset="test", **{key: "ten"})


def test_unknown_model_task_and_preset_are_clear_errors():
    with pytest.raises(ModelConfigError, match=r"unknown model 'medfusion'; available models: .*medfuse"):
        create_model("medfusion", "mortality", F, S)
    with pytest.raises(ModelConfigError, match="unknown task 'ihm'"):
        create_model("lstm", "ihm", F, S)
    with pytest.raises(ModelConfigError, match="unknown preset 'tiny'"):
        create_model("lstm", "mortality", F, S, preset="tiny")
    with pytest.raises(ModelConfigError, match="'backbone' must be one of"):
        create_model("resnet", "mortality", F, S, preset="test", backbone="vgg16")


def test_overrides_apply_after_the_preset():
    model = create_model("lstm", "phenotype", F, S, preset="test", dropout=0.0)
    assert model.hparams == {"hidden": 8, "layers": 1, "bidirectional": True, "dropout": 0.0}
    assert isinstance(model.hparams["dropout"], float)


def test_register_rejects_bad_classes_and_duplicate_names():
    class NotAModel:
        pass

    with pytest.raises(TypeError):
        register("bad")(NotAModel)

    class Other(BaseModel):
        modalities = ("ehr",)

    with pytest.raises(ValueError, match="already registered"):
        register("lstm")(Other)

    class BadSpace(BaseModel):
        modalities = ("ehr",)
        search_space: ClassVar[dict] = {"lr": {"type": "float", "low": 0.1, "high": 1.0}}

    with pytest.raises(ValueError, match="unknown hyper-parameter 'lr'"):
        register("bad_space")(BadSpace)
    assert "bad_space" not in list_models()


@pytest.mark.parametrize("name", MODELS)
def test_every_search_space_value_builds_a_model(name):
    """The declared search space is usable: both bounds of every range and every choice resolve and build."""
    cls = get_model_class(name)
    for key, spec in cls.search_space.items():
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in values:
            model = create_model(name, "phenotype", F, S, preset="test", **{key: value})
            assert model.hparams[key] == value, (key, value)


BAD_SPACES = [
    ({"dropout": {"type": "uniform", "low": 0.0, "high": 0.5}}, "'type' must be one of"),
    ({"dropout": {"type": "float", "low": 0.5, "high": 0.5}}, "needs low < high"),
    ({"dropout": {"type": "float", "low": 0.0, "high": 0.5, "log": True}}, "a log scale needs low > 0"),
    ({"dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1}}, "unknown keys \\['step'\\]"),
    (
        {"dropout": {"type": "int", "low": 0, "high": 1}},
        "an int space for a hyper-parameter whose default is 0.2",
    ),
    ({"hidden": {"type": "int", "low": 8, "high": 64.5}}, "'low' and 'high' must be integers"),
    ({"hidden": {"type": "categorical", "choices": []}}, "'choices' must be a non-empty list"),
    ({"hidden": {"type": "categorical", "choices": [8, 8]}}, "'choices' repeat a value"),
    ({"hidden": {"type": "categorical", "choices": [8, "wide"]}}, "choice 'wide' is not a int"),
    ({"width": {"type": "int", "low": 1, "high": 2}}, "names unknown hyper-parameter 'width'"),
]


@pytest.mark.parametrize(("space", "message"), BAD_SPACES)
def test_a_malformed_search_space_is_refused_at_registration(space, message):
    class Bad(BaseModel):
        modalities = ("ehr",)
        default_hparams: ClassVar[dict] = {"hidden": 16, "dropout": 0.2}
        search_space: ClassVar[dict] = space

    with pytest.raises(ValueError, match=message):
        register("bad_space_model")(Bad)
    assert "bad_space_model" not in list_models()
