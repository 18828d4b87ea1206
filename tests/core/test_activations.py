"""Per-step activations in the core: sliced by layer, unit and state as asked and equal to PyTorch's;
selections are sets; a model exported without activations refuses them clearly and serves the rest.
(The rules every entry point keeps, a selection that does not fit the model among them, are
tests/core/test_entry_points.py's.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.config import Settings
from service.core.outputs import ActivationRequest, OutputOptions
from service.core.packed import PackedInput
from service.core.sessions import SessionService
from service.engine.engine import Engine, EngineOptions
from service.engine.runtime import ActivationsUnavailable, RuntimeOptions
from service.errors import InvalidInput
from service.repository.models import ModelRepository
from service.store import MemoryStore
from service.types import NamedTensor, StepInput
from tests.core.conftest import MakeCore
from tests.helpers import TOL, torch_layers


def _acts(named: list[NamedTensor] | None) -> dict[str, np.ndarray]:
    return {t.name: t.value for t in named or []}


def _asking(request: ActivationRequest | None, final_only: bool = False) -> OutputOptions:
    return OutputOptions(activations=request, final_only=final_only)


_SEQ = np.arange(20) % 98


@pytest.fixture(scope="module")
def want(tiny_models: Path) -> dict[str, np.ndarray]:
    """lstm-lm's layers over _SEQ in PyTorch, once for every store."""
    return torch_layers(tiny_models / "lstm-lm" / "1", _SEQ)


async def test_layer_unit_and_state_selection(make_core: MakeCore, want: dict[str, np.ndarray]) -> None:
    tokens = _SEQ.tolist()
    async with make_core() as core:
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        r = await core.step("t", StepInput(sid, tokens=tokens, options=_asking(ActivationRequest(
            layers=(-1, 0), units=(3, 1, 7), states=("c",)))))
        acts = _acts(r.activations)
        assert list(acts) == ["c_l1", "c_l0"]
        assert np.abs(acts["c_l1"] - want["c_l1"][:, [3, 1, 7]]).max() <= TOL
        assert np.abs(acts["c_l0"] - want["c_l0"][:, [3, 1, 7]]).max() <= TOL
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        last = await core.step("t", StepInput(sid, tokens=tokens, options=_asking(ActivationRequest(states=("h",)),
                                                                               final_only=True)))
        assert [t.name for t in last.activations or []] == ["h_l0", "h_l1"]
        assert np.abs(_acts(last.activations)["h_l1"] - want["h_l1"][-1:]).max() <= TOL
        sid = (await core.create("t", "lstm-lm", 0)).session_id
        assert not (await core.step("t", StepInput(sid, tokens=tokens))).activations


@pytest.mark.parametrize(("fields", "message"), [
    ({"units": (3, 1, 3)}, "activation_units is a set"),
    ({"states": ("h", "h")}, "activation_states is a set"),
    ({"layers": (0,) * 4097}, "at most 4096"),
])
def test_a_selection_is_a_set(fields: dict, message: str) -> None:
    """A name given twice would multiply the reply: refused as the selection is made, before any model."""
    with pytest.raises(InvalidInput, match=message):
        ActivationRequest(**fields)


async def test_a_model_exported_without_activations_refuses_clearly(tiny_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "lstm-lm", models / "old")
    manifest_path = models / "old" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.pop("activations")
    manifest["name"] = "old"
    manifest_path.write_text(json.dumps(manifest))
    (models / "old" / "1" / "activations.onnx").unlink()
    core = SessionService(Settings(), ModelRepository.load(models, RuntimeOptions()), MemoryStore(),
                          Engine(EngineOptions()))
    try:
        sid = (await core.create("t", "old", 0)).session_id
        with pytest.raises(ActivationsUnavailable) as e:
            await core.step("t", StepInput(sid, tokens=[1, 2, 3], options=_asking(ActivationRequest())))
        assert e.value.code == "FAILED_PRECONDITION"
        assert "exported without activation outputs" in str(e.value) and "export it again" in str(e.value)
        assert (await core.get("t", sid)).offset == 0
        assert (await core.step("t", StepInput(sid, tokens=[1, 2, 3]))).offset == 3  # everything else still serves
        packed = await core.step_packed("t", PackedInput([sid], [1], tokens=np.array([4], "<i4").tobytes(),
                                                         activations=ActivationRequest()))
        assert isinstance(packed.errors[0], ActivationsUnavailable)
        assert (await core.get("t", sid)).offset == 3
    finally:
        await core.close()
